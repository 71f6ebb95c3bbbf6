// The concepts view of a node: a dictionary of directions fitted to the node's activations on the
// probe images (NMF, a sparse autoencoder or PCA; see docs/concepts.md), each concept drawn as a
// feature visualization. Each step's concepts are matched to those of a reference step (the run's
// last logged step when the view opened), so moving the slider keeps concept k in its place and
// swaps its picture. A concept's page shows it as a unit's page does: its picture, its dataset
// examples (each with its attribution overlaid, when asked), and a filmstrip over training with
// its similarity to the reference step.

import {getResult, route} from './api.js';
import {AttributionControls, Attributions, errorBox, h, lineChart, OverlaidImage, select,
  UnitCell} from './dom.js';
import {nodeHead} from './node.js';

export const METHODS = ['nmf', 'sae', 'pca'];
export const DEFAULT_COUNT = 16;
const COUNTS = [4, 8, 16, 32, 64];
const EXAMPLES = 8;  // dataset examples on a concept's page
const METHOD_TITLES = {
  nmf: 'non-negative matrix factorization: assumes non-negative activations (a node after a '
    + 'ReLU); concepts are parts that add up',
  sae: 'a sparse autoencoder: a few concepts active at once, directions of any sign',
  pca: 'principal components: the baseline, assumes nothing',
};
// A fit that failed because NMF met signed activations says what to use instead.
const SIGNED = "method='sae'";

// The node's nmf fits that failed on signed activations, by run and node: the tab then uses sae
// for them, on every page, until the user picks a method.
const fallbacks = new Set();

// The method a view of `node`'s concepts uses: the URL's, else nmf, or sae where nmf failed.
export function conceptsMethod(state, node) {
  return state.method ?? (fallbacks.has(`${state.run}|${node.name}`) ? 'sae' : 'nmf');
}

// The count of concepts shown when the URL names none: 16, but NMF and PCA find no more concepts
// than the node has units.
export function defaultCount(node, method) {
  return method === 'sae' ? DEFAULT_COUNT : Math.min(DEFAULT_COUNT, node.units);
}

// The largest count a request may ask for: the server's --microscope_max_count, and for NMF and
// PCA the node's units.
export function maxCount(app, node, method) {
  const most = app.settings.limits?.count ?? 64;
  return method === 'sae' ? most : Math.min(most, node.units);
}

function percent(value) {
  return `${Math.round(100 * value)}%`;
}

function similarityText(value) {
  return value === null || value === undefined ? '—' : value.toFixed(2);
}

// What a waiting status says, for a line of `what` at `step`.
function waitingText(step, what, wait) {
  if (wait.status !== 'running') return `step ${step}: ${what} queued #${(wait.position ?? 0) + 1}`;
  const progress = wait.progress ? `, ${Math.round(100 * wait.progress)}%` : '';
  return `step ${step}: ${what} being computed${progress}`;
}

// The method, count and reference step a view of the concepts of `node` asks for, and the
// fallback from nmf to sae where the user did not pick the method and nmf fails on the node's
// signed activations.
class ConceptsQuery {
  constructor(app, state, node) {
    Object.assign(this, {app, node, run: state.run});
    this.key = `${state.run}|${node.name}`;
    this.explicit = state.method !== undefined;
    this.fellBack = !this.explicit && fallbacks.has(this.key);
    this.method = conceptsMethod(state, node);
    this.count = state.count ?? defaultCount(node, this.method);
    this.last = app.run.steps[app.run.steps.length - 1];
    this.referenceStep = state.reference ?? this.last;
  }

  params(step, extra = {}) {
    return {run: this.run, step, node: this.node.name, count: this.count, method: this.method,
      reference_step: this.referenceStep, ...extra};
  }

  // The route's answer at `step`; once nmf fails on signed activations (and the user did not ask
  // for nmf), sae's, `onFallback()` told first.
  async get(step, extra, signal, onWait, onFallback) {
    const params = this.params(step, extra);
    try {
      return await getResult('concepts', params, signal, onWait);
    } catch (error) {
      if (this.explicit || params.method !== 'nmf' || error.status !== 400
        || !error.message.includes(SIGNED)) throw error;
      fallbacks.add(this.key);
      this.fellBack = true;
      this.method = 'sae';
      this.count = Math.min(this.count, maxCount(this.app, this.node, 'sae'));
      onFallback?.(error.message);
      return getResult('concepts', this.params(step, extra), signal, onWait);
    }
  }

  // What the visible note says after a fallback.
  fallbackNote() {
    return `The node's activations are signed (no ReLU after it), which NMF cannot fit: these `
      + 'concepts are by a sparse autoencoder (sae) instead. Pick a method to choose another.';
  }

  // The URL's state that opens concept k of these concepts (the reference step only where it is
  // not the run's last: new snapshots came since the view opened).
  conceptPatch(k) {
    return {concept: k, reference: this.referenceStep === this.last ? null : this.referenceStep};
  }
}

// Pictures at the URLs given, decoded before they are shown (so a step swaps without a flash).
async function decoded(urls) {
  await Promise.all(urls.map((url) => {
    const image = new Image();
    image.src = url;
    return image.decode();
  }));
}

// A unit's number, a link to the unit.
function unitLink(app, unit) {
  return h('a', {class: 'address', href: app.link({unit}), text: String(unit),
    title: `unit ${unit}`, onclick: (event) => {
      event.preventDefault();
      app.navigate({unit});
    }});
}

export class ConceptsView {
  constructor(app, state, node) {
    Object.assign(this, {app, node});
    this.query = new ConceptsQuery(app, state, node);
    const {method, count} = this.query;
    // A method picked keeps the count where the method allows it; the defaults stay out of the URL.
    this.methodSelect = select(METHODS.map((m) => [m, m]), method, (value) => {
      const kept = Math.min(this.query.count, maxCount(app, node, value));
      app.navigate({method: value, count: kept === defaultCount(node, value) ? null : kept});
    }, {id: 'concepts-method', 'aria-label': 'method', title: METHOD_TITLES[method]});
    for (const option of this.methodSelect.options) option.title = METHOD_TITLES[option.value];
    this.countSelect = select([], String(count), (value) => app.navigate({
      count: Number(value) === defaultCount(node, this.query.method) ? null : Number(value)}),
    {id: 'concepts-count', 'aria-label': 'count'});
    this.countOptions();
    this.status = h('p', {class: 'muted concepts-status', role: 'status', text: 'waiting'});
    this.explained = h('p', {class: 'concepts-explained', hidden: true});
    this.note = h('p', {class: 'note concepts-note', role: 'note', hidden: true});
    this.failure = h('div', {});
    this.cells = [...Array(count).keys()].map((k) => this.cellOf(k));
    this.grid = h('div', {class: 'concepts-grid', dataset: {referenceStep: this.query.referenceStep,
      count}}, this.cells.map((cell) => cell.el));
    this.el = h('section', {class: 'concepts-view'},
      nodeHead(app, node, 'concepts',
        h('label', {class: 'control', title: METHOD_TITLES[method]}, 'method ', this.methodSelect),
        h('label', {class: 'control'}, 'count ', this.countSelect)),
      this.note, this.status, this.failure, this.explained, this.grid);
    this.showNote();
    this.show(state.step);
  }

  // The counts the method allows on this server (--microscope_max_count), and the one shown.
  countOptions() {
    const {count, method} = this.query;
    const counts = [...new Set([...COUNTS.filter((c) => c <= maxCount(this.app, this.node,
      method)), count])].sort((a, b) => a - b);
    this.countSelect.replaceChildren(...counts.map((c) => h('option', {value: String(c),
      text: String(c)})));
    this.countSelect.value = String(count);
  }

  cellOf(k) {
    const picture = h('img', {class: 'concept-picture', alt: `concept ${k}`, hidden: true});
    const similarity = h('span', {class: 'concept-similarity'});
    const units = h('div', {class: 'concept-units muted'});
    const link = h('a', {class: 'concept-frame', href: this.app.link(this.query.conceptPatch(k)),
      title: `open concept ${k}: its examples and its pictures over training`,
      onclick: (event) => {
        event.preventDefault();
        this.app.navigate(this.query.conceptPatch(k));
      }}, picture);
    const el = h('figure', {class: 'concept', dataset: {concept: k}},
      link, h('figcaption', {}, h('span', {text: `concept ${k}`}), similarity), units);
    similarity.title = 'its similarity to its counterpart at the reference step';
    return {el, picture, similarity, units};
  }

  showNote() {
    this.note.hidden = !this.query.fellBack;
    if (this.query.fellBack) {
      this.note.textContent = this.query.fallbackNote();
      this.methodSelect.value = 'sae';
      this.countOptions();
    }
  }

  async show(step) {
    this.controller?.abort();
    this.controller = new AbortController();
    const signal = this.controller.signal;
    this.step = step;
    this.grid.dataset.state = 'loading';
    this.failure.replaceChildren();
    const preview = this.app.settings.atlas?.preview;
    for (const quality of preview ? ['preview', 'full'] : ['full']) {
      const what = quality === 'preview' ? 'a first look at the concepts is' : 'the concepts are';
      let found;
      try {
        found = await this.query.get(step, {quality}, signal,
          (wait) => {
            this.status.textContent = waitingText(step, what, wait);
          }, () => this.showNote());
        if (signal.aborted) return;
        const urls = found.pictures.map((url) => route(url));
        await decoded(urls);
        if (signal.aborted) return;
        this.draw(found, urls, quality);
      } catch (error) {
        if (signal.aborted) return;
        this.grid.dataset.state = 'failed';
        this.status.textContent = `step ${step}: the concepts could not be computed`;
        this.failure.replaceChildren(errorBox(error.message));
        return;
      }
    }
  }

  draw(found, urls, quality) {
    this.found = found;
    Object.assign(this.grid.dataset, {state: quality === 'full' ? 'done' : 'preview',
      step: found.step, quality, method: found.method});
    this.explained.hidden = false;
    this.explained.replaceChildren(h('strong', {text: `R² ${found.explained.toFixed(2)}`}),
      `: the dictionary reconstructs ${percent(found.explained)} of the activations' variance`,
      h('span', {class: 'muted', text: ` · under each concept: its similarity to its `
        + `counterpart at step ${found.reference_step} (1 at that step itself) and the units its `
        + 'direction leans on most'}));
    this.status.textContent = `step ${found.step}${quality === 'preview' ? ' (a first look; the '
      + 'full pictures are on their way)' : ''} · ${found.count} concepts by ${found.method} `
      + `from ${found.samples} activations on the probe images, matched to step `
      + `${found.reference_step} · click a concept for its examples and its pictures over training`;
    this.cells.forEach((cell, k) => {
      cell.picture.src = urls[k];
      cell.picture.hidden = false;
      cell.el.dataset.step = found.step;
      const value = found.similarity[k];
      cell.similarity.textContent = similarityText(value);
      cell.similarity.title = `similarity to its counterpart at step ${found.reference_step} `
        + '(correlation of their codes on the probe images)';
      cell.units.replaceChildren('units ', ...found.units[k].flatMap((unit, i) =>
        (i ? [' ', unitLink(this.app, unit)] : [unitLink(this.app, unit)])));
    });
  }

  update(state) {
    if (state.step !== this.step) this.show(state.step);
    return true;
  }

  destroy() {
    this.controller?.abort();
  }
}

// Concept k over every logged step, at preview quality: a frame per step (each a link to it) and
// the concept's similarity to its counterpart at the reference step, as a chart.
class ConceptFilmstrip {
  constructor(app, query, concept) {
    Object.assign(this, {app, query, concept});
    this.steps = app.run.steps;
    this.controller = new AbortController();
    this.similarity = new Array(this.steps.length).fill(null);
    this.frames = this.steps.map((step) => new UnitCell(String(step), {
      href: app.link({step}),
      onclick: (event) => {
        event.preventDefault();
        app.navigate({step});
      },
    }));
    this.frames.forEach((frame, i) => {
      frame.el.dataset.step = this.steps[i];
    });
    this.chart = h('div', {class: 'concept-chart'});
    this.el = h('section', {class: 'filmstrip-section'},
      h('h3', {text: `Over training: concept ${concept} at every logged step`}),
      h('div', {class: 'filmstrip concept-filmstrip'}, this.frames.map((frame) => frame.el)),
      h('h3', {text: `Similarity to its counterpart at step ${query.referenceStep}`}),
      this.chart,
      h('p', {class: 'muted legend', text: 'the correlation of the two concepts\' codes on the '
        + 'probe images; 1 at the reference step itself'}));
    this.steps.forEach((step, i) => this.load(step, i));
  }

  async load(step, i) {
    const signal = this.controller.signal;
    const frame = this.frames[i];
    try {
      const found = await this.query.get(step, {quality: 'preview'}, signal,
        (wait) => frame.update({status: wait.status === 'running' ? 'running' : 'queued',
          progress: wait.progress, position: wait.position}));
      if (signal.aborted) return;
      const url = route(found.pictures[this.concept]);
      frame.update({status: 'done', urls: [url]});
      this.similarity[i] = found.similarity[this.concept];
      this.draw();
    } catch (error) {
      if (!signal.aborted) frame.update({status: 'failed', error: error.message});
    }
  }

  mark(step) {
    this.step = step;
    const index = this.steps.indexOf(step);
    this.frames.forEach((frame, i) => frame.el.classList.toggle('current', i === index));
    requestAnimationFrame(() => this.reveal(index));
    this.draw();
  }

  // Scroll the strip (only it, never the page) so that the current step's frame shows.
  reveal(index) {
    const frame = this.frames[index]?.el;
    const strip = frame?.parentElement;
    if (!strip) return;
    const left = frame.offsetLeft, right = left + frame.offsetWidth;
    if (left < strip.scrollLeft || right > strip.scrollLeft + strip.clientWidth) {
      strip.scrollLeft = left - (strip.clientWidth - frame.offsetWidth) / 2;
    }
  }

  draw() {
    const values = this.similarity.filter((v) => v !== null && v !== undefined);
    const lo = Math.min(0, Math.floor(10 * Math.min(...values, 0)) / 10);
    this.chart.replaceChildren(lineChart(this.steps.map(String), [{name: 'similarity',
      className: 'correlation', values: this.similarity}], {lo, hi: 1,
      marker: this.steps.indexOf(this.step), onPick: (i) => this.app.navigate({step: this.steps[i]})}));
    this.chart.dataset.values = values.length;
  }

  destroy() {
    this.controller.abort();
  }
}

// A concept's page: its picture large, its dataset examples at the step shown, and concept k over
// training. With the attribution on, each example shows which of its pixels drive the concept (by
// the method picked); the overlay, its method and the attributions fetched are kept while the
// steps are scrubbed.
export class ConceptView {
  constructor(app, state, node) {
    Object.assign(this, {app, node, concept: state.concept});
    this.query = new ConceptsQuery(app, state, node);
    const {count} = this.query;
    const other = (k, text) => h('button', {text, disabled: k < 0 || k >= count,
      onclick: () => app.navigate({concept: k})});
    this.note = h('p', {class: 'note concepts-note', role: 'note', hidden: true});
    this.picture = h('img', {class: 'concept-big', alt: `concept ${state.concept}`, hidden: true});
    this.pictureState = h('p', {class: 'muted concepts-status', role: 'status', text: 'waiting'});
    this.facts = h('div', {class: 'concept-facts'});
    this.examples = h('div', {class: 'examples concept-examples'});
    this.exampleImages = [];  // [probe image index, its OverlaidImage]
    const methods = app.settings.attribution_methods;
    this.attributionOptions = {overlay: false, method: methods[0]};
    this.controls = new AttributionControls(methods, this.attributionOptions, 'the concept',
      () => this.showAttributions());
    this.attributions = new Attributions((step, index, method, signal, onWait) => this.query.get(
      step, {view: 'attribution', concept: this.concept, image: index, attribution: method},
      signal, onWait, () => this.showNote()));
    this.filmstrip = new ConceptFilmstrip(app, this.query, state.concept);
    this.el = h('section', {class: 'concept-view'},
      h('div', {class: 'view-head'},
        h('h2', {}, h('span', {class: 'address', text: `${node.name} · concept ${state.concept}`})),
        h('span', {class: 'muted', text: `of ${count} concepts by ${this.query.method}, matched to `
          + `step ${this.query.referenceStep}`}),
        other(state.concept - 1, '← previous concept'), other(state.concept + 1, 'next concept →')),
      this.note,
      h('div', {class: 'unit-body'},
        h('div', {class: 'technique-panel'}, h('div', {class: 'concept-big-frame'}, this.picture),
          this.pictureState, this.facts,
          h('h3', {text: 'Dataset examples: the probe images it is strongest on'}),
          h('div', {class: 'examples-controls'}, ...this.controls.els), this.attributions.notes,
          this.examples),
        h('div', {class: 'over-training'}, this.filmstrip.el)));
    this.showNote();
    this.update(state);
  }

  showNote() {
    this.note.hidden = !this.query.fellBack;
    if (this.query.fellBack) this.note.textContent = this.query.fallbackNote();
  }

  update(state) {
    this.filmstrip.mark(state.step);
    if (state.step === this.step) return true;
    this.step = state.step;
    this.controller?.abort();
    this.controller = new AbortController();
    this.attributions.restart();
    this.showPicture(state.step, this.controller.signal);
    this.showExamples(state.step, this.controller.signal);
    return true;
  }

  async showPicture(step, signal) {
    const k = this.concept;
    const preview = this.app.settings.atlas?.preview;
    for (const quality of preview ? ['preview', 'full'] : ['full']) {
      try {
        const found = await this.query.get(step, {quality}, signal, (wait) => {
          this.pictureState.textContent = waitingText(step, 'the concept is', wait);
        }, () => this.showNote());
        if (signal.aborted) return;
        const url = route(found.pictures[k]);
        await decoded([url]);
        if (signal.aborted) return;
        this.picture.src = url;
        this.picture.hidden = false;
        this.picture.dataset.step = found.step;
        this.picture.dataset.quality = quality;
        this.pictureState.textContent = `step ${found.step}${quality === 'preview'
          ? ' · a first look' : ''}`;
        this.facts.replaceChildren(
          h('p', {class: 'concept-similarity', text: `similarity to its counterpart at step `
            + `${found.reference_step}: ${similarityText(found.similarity[k])}`}),
          h('p', {class: 'concept-units'}, 'leans most on units ',
            ...found.units[k].flatMap((unit, i) => (i ? [', ', unitLink(this.app, unit)]
              : [unitLink(this.app, unit)]))),
          h('p', {class: 'muted', text: `the ${found.count} concepts reconstruct `
            + `${percent(found.explained)} of the activations' variance (R² `
            + `${found.explained.toFixed(2)})`}));
      } catch (error) {
        if (signal.aborted) return;
        this.pictureState.replaceChildren(errorBox(error.message));
        return;
      }
    }
  }

  async showExamples(step, signal) {
    const waiting = h('p', {class: 'muted', text: 'loading…'});
    this.examples.replaceChildren(waiting);
    delete this.examples.dataset.step;
    this.exampleImages = [];
    try {
      const data = await this.query.get(step, {view: 'examples', concept: this.concept,
        examples: EXAMPLES}, signal, (wait) => {
        waiting.textContent = wait.status === 'running' ? 'computing…'
          : `queued #${(wait.position ?? 0) + 1}…`;
      }, () => this.showNote());
      if (signal.aborted) return;
      const [, height, width] = this.app.run.probe?.shape || [0, 1, 1];
      this.examples.replaceChildren(...data.examples.map((example) => {
        const [top, left, bottom, right] = example.box;
        const box = h('div', {class: 'box', style: `top:${100 * top / height}%;`
          + `left:${100 * left / width}%;height:${100 * (bottom - top) / height}%;`
          + `width:${100 * (right - left) / width}%`});
        const image = new OverlaidImage(example.image, box, 'example-image',
          `probe image ${example.index}`);
        this.exampleImages.push([example.index, image]);
        return h('figure', {class: 'example concept-example', dataset: {index: example.index}},
          h('div', {class: 'concept-shots'}, image.el,
            h('img', {class: 'concept-crop', src: example.crop, alt: '',
              title: `the region of probe image ${example.index} where the concept is strongest`})),
          h('figcaption', {}, `probe #${example.index} · code ${example.activation.toFixed(2)}`));
      }));
      if (!data.examples.length) this.examples.replaceChildren(h('p', {text: 'no probe images'}));
      this.examples.dataset.step = step;
      this.showAttributions();
    } catch (error) {
      if (!signal.aborted) this.examples.replaceChildren(errorBox(error.message));
    }
  }

  // Each example's attribution at the step shown, while the overlay is on.
  showAttributions() {
    this.attributions.restart();
    this.controls.refresh();
    const {overlay, method} = this.attributionOptions;
    for (const [index, image] of this.exampleImages) {
      if (!overlay) image.hide();
      else this.attributions.get(this.step, index, method, (result) => image.show(result));
    }
  }

  destroy() {
    this.controller?.abort();
    this.attributions.destroy();
    this.filmstrip.destroy();
  }
}
