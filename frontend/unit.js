// The unit view: the unit drawn by each technique, its dataset examples (with each one's
// attribution overlaid, its attribution over training and its caricature) and its weights (each
// input unit a link, to walk a circuit), a filmstrip of the unit over every logged step that plays
// as an animation, and its evolution curve.

import {getResult, watchUnits} from './api.js';
import {AttributionControls, Attributions, errorBox, h, lineChart, OverlaidImage, select,
  UnitCell} from './dom.js';

const FRAME_MS = 350;

// What a panel says while the server computes its result.
function waiting(el) {
  return (status) => {
    el.textContent = status.status === 'running' ? 'computing…'
      : `queued #${(status.position ?? 0) + 1}…`;
  };
}

class Filmstrip {
  constructor(app, state, technique) {
    this.app = app;
    this.steps = app.run.steps;
    this.controller = new AbortController();
    this.frames = this.steps.map((step) => new UnitCell(String(step), {
      href: app.link({step}),
      onclick: (event) => {
        event.preventDefault();
        this.stop();
        app.navigate({step});
      },
    }));
    this.player = h('img', {class: 'player', alt: ''});
    this.playerLabel = h('span', {class: 'muted'});
    this.button = h('button', {class: 'play', text: '▶ play', onclick: () => this.toggle()});
    this.el = h('section', {class: 'filmstrip-section'},
      h('h3', {}, `Over training: ${technique.replace('_', ' ')}, every logged step`),
      h('div', {class: 'film-head'}, h('div', {class: 'player-frame'}, this.player),
        h('div', {}, this.button, ' ', this.playerLabel)),
      h('div', {class: 'filmstrip'}, this.frames.map((frame) => frame.el)));
    this.urls = new Array(this.steps.length).fill(null);
    this.steps.forEach((step, i) => {
      const group = app.group(state.run, step, state.node, technique);
      watchUnits(group, [state.unit], 1, (unit, frameState) => {
        this.frames[i].update(frameState);
        if (frameState.status === 'done') {
          this.urls[i] = frameState.urls[0];
          if (i === this.index) this.showFrame(i);
        }
      }, this.controller.signal);
    });
    this.mark(state.step);
  }

  mark(step) {
    this.index = this.steps.indexOf(step);
    this.frames.forEach((frame, i) => frame.el.classList.toggle('current', i === this.index));
    requestAnimationFrame(() => this.reveal());
    if (!this.timer) this.showFrame(this.index);
  }

  // Scroll the strip (only it, never the page) so that the current step's frame shows.
  reveal() {
    const frame = this.frames[this.index]?.el;
    const strip = frame?.parentElement;
    if (!strip) return;
    const left = frame.offsetLeft, right = left + frame.offsetWidth;
    if (left < strip.scrollLeft || right > strip.scrollLeft + strip.clientWidth) {
      strip.scrollLeft = left - (strip.clientWidth - frame.offsetWidth) / 2;
    }
  }

  showFrame(i) {
    this.playerLabel.textContent = `step ${this.steps[i]}`;
    if (this.urls[i]) this.player.src = this.urls[i];
    this.frames.forEach((frame, j) => frame.el.classList.toggle('playing', Boolean(this.timer) && j === i));
  }

  toggle() {
    if (this.timer) return this.stop();
    let i = this.index;
    this.button.textContent = '❚❚ pause';
    this.timer = setInterval(() => {
      i = (i + 1) % this.steps.length;
      this.showFrame(i);
    }, FRAME_MS);
    return undefined;
  }

  stop() {
    clearInterval(this.timer);
    this.timer = null;
    this.button.textContent = '▶ play';
    this.showFrame(this.index);
  }

  destroy() {
    this.stop();
    this.controller.abort();
  }
}

class Evolution {
  constructor(app, state) {
    this.app = app;
    this.el = h('section', {class: 'evolution'},
      h('h3', {text: 'Evolution: how much the unit changed since the previous logged step'}),
      h('p', {class: 'muted', text: 'loading…'}));
    this.controller = new AbortController();
    getResult('history', {run: state.run, node: state.node, unit: state.unit},
      this.controller.signal, waiting(this.el.lastChild)).then((data) => {
      this.history = data.history;
      this.draw(state.step);
    }).catch((error) => {
      if (!this.controller.signal.aborted) this.el.lastChild.replaceWith(errorBox(error.message));
    });
  }

  draw(step) {
    if (!this.history) return;
    const steps = this.history.map((entry) => entry.step);
    const series = [
      {name: 'weight cosine', className: 'cosine',
        values: this.history.map((e) => e.weight_cosine)},
      {name: 'activation correlation', className: 'correlation',
        values: this.history.map((e) => e.activation_correlation)},
    ];
    const values = series.flatMap((s) => s.values).filter((v) => v !== null);
    const lo = Math.min(0.9, Math.floor(10 * Math.min(...values, 1)) / 10);
    const chart = lineChart(steps, series, {lo, hi: 1, marker: steps.indexOf(step),
      onPick: (i) => this.app.navigate({step: steps[i]})});
    const legend = h('div', {class: 'legend'},
      h('span', {class: 'key cosine', text: 'incoming weights: cosine to the previous step'}),
      h('span', {class: 'key correlation',
        text: 'activations on the probe images: correlation with the previous step'}));
    this.el.replaceChildren(this.el.firstChild, chart, legend);
  }

  destroy() {
    this.controller.abort();
  }
}

// What the examples tab shows besides the examples, kept while the unit view lives, so that
// scrubbing the steps keeps it: the attribution overlay (on or off), its method, the example whose
// attribution over training is shown, the caricatures, and the attributions fetched so far.
function examplesOptions(app) {
  return {overlay: false, method: app.settings.attribution_methods[0], selected: null,
    caricatures: false, results: new Map()};
}

// The examples tab: the probe images that excite the unit most, its peak's region boxed. With the
// overlay on, each example shows which of its pixels drive the unit (attribution, by the method
// picked), and the example picked (the first, until one is clicked) has its attribution at every
// logged step in a strip below. With caricatures on, each example shows what the node sees in
// it, exaggerated.
class ExamplesPanel {
  constructor(app, state, options) {
    Object.assign(this, {app, state, options, examples: []});
    this.controller = new AbortController();
    this.controls = new AttributionControls(app.settings.attribution_methods, options, 'the unit',
      () => this.refresh());
    const {run, node, unit} = state;
    this.attributions = new Attributions((step, index, method, signal, onWait) => getResult(
      'attribution', {run, step, node, unit, image: index, method}, signal, onWait),
    options.results);
    this.caricatureToggle = h('input', {type: 'checkbox', id: 'caricatures',
      checked: options.caricatures,
      onchange: () => this.setCaricatures(this.caricatureToggle.checked)});
    this.grid = h('div', {class: 'examples'}, h('p', {class: 'muted', text: 'loading…'}));
    this.stripTitle = h('h3', {});
    this.strip = h('div', {class: 'strip'});
    this.stripSection = h('section', {class: 'attribution-strip', hidden: true}, this.stripTitle,
      this.strip);
    this.el = h('div', {class: 'examples-panel'},
      h('div', {class: 'examples-controls'},
        ...this.controls.els,
        h('label', {class: 'control'}, this.caricatureToggle, ' caricatures')),
      this.attributions.notes, this.grid, this.stripSection);
    const [, height, width] = app.run.probe?.shape || [0, 1, 1];
    getResult('examples', {run: state.run, step: state.step, node: state.node, unit: state.unit,
      count: 12}, this.controller.signal, waiting(this.grid.firstChild)).then((data) => {
      this.examples = data.examples.map((example) => this.exampleOf(example, height, width));
      this.grid.replaceChildren(...this.examples.map((e) => e.el));
      if (!data.examples.length) this.grid.replaceChildren(h('p', {text: 'no probe images'}));
      this.refresh();
    }).catch((error) => {
      if (!this.controller.signal.aborted) this.grid.replaceChildren(errorBox(error.message));
    });
  }

  exampleOf(example, height, width) {
    const [top, left, bottom, right] = example.box;
    const box = h('div', {class: 'box', style: `top:${100 * top / height}%;`
      + `left:${100 * left / width}%;height:${100 * (bottom - top) / height}%;`
      + `width:${100 * (right - left) / width}%`});
    const image = new OverlaidImage(example.image, box);
    const caricature = new UnitCell(null, {className: 'caricature'});
    caricature.el.title = `caricature: what ${this.state.node} sees in probe #${example.index}, `
      + 'exaggerated';
    const el = h('figure', {class: 'example', dataset: {index: example.index},
      onclick: () => this.select(example.index)},
    image.el, caricature.el,
    h('figcaption', {}, `probe #${example.index} · ${example.activation.toFixed(2)}`));
    return {example, image, caricature, el};
  }

  setCaricatures(on) {
    this.options.caricatures = on;
    this.showCaricatures();
  }

  select(index) {
    if (!this.options.overlay || index === this.options.selected) return;
    this.options.selected = index;
    this.showStrip();
  }

  // The selected example: the one picked, else the first.
  selected() {
    return this.examples.find((e) => e.example.index === this.options.selected)
      || this.examples[0];
  }

  refresh() {
    this.attributions.restart();
    const {overlay, method} = this.options;
    this.controls.refresh();
    this.el.classList.toggle('overlaid', overlay);
    this.stripSection.hidden = !overlay || !this.examples.length;
    for (const {example, image} of this.examples) {
      if (!overlay) image.hide();
      else this.attributions.get(this.state.step, example.index, method, (r) => image.show(r));
    }
    if (overlay) this.showStrip();
    this.showCaricatures();
  }

  // The selected example's attribution at every logged step, the current step marked; a frame
  // opens its step.
  showStrip() {
    const chosen = this.selected();
    if (!chosen) return;
    for (const e of this.examples) e.el.classList.toggle('selected', e === chosen);
    const {index, image} = chosen.example;
    this.stripTitle.textContent = `Probe #${index} over training: its attribution `
      + `(${this.options.method.replace('_', ' ')}) at every logged step`;
    this.strip.replaceChildren(...this.app.run.steps.map((step) => {
      const frame = new OverlaidImage(image, null, 'strip-image');
      this.attributions.get(step, index, this.options.method, (result) => frame.show(result));
      return h('a', {class: `strip-frame${step === this.state.step ? ' current' : ''}`,
        href: this.app.link({step}), dataset: {step},
        onclick: (event) => {
          event.preventDefault();
          this.app.navigate({step});
        }}, frame.el, h('span', {class: 'step', text: String(step)}));
    }));
    requestAnimationFrame(() => {
      const current = this.strip.querySelector('.current');
      if (current) this.strip.scrollLeft = current.offsetLeft - this.strip.clientWidth / 2;
    });
  }

  // Each example's caricature (the technique's units are probe images), in one render group.
  showCaricatures() {
    this.caricatureController?.abort();
    this.caricatureController = new AbortController();
    const on = this.options.caricatures && this.examples.length > 0;
    this.el.classList.toggle('caricatured', on);
    if (!on) return;
    const cells = new Map(this.examples.map((e) => [e.example.index, e.caricature]));
    const {run, step, node} = this.state;
    watchUnits(this.app.group(run, step, node, 'caricature'), [...cells.keys()], 1,
      (index, state) => cells.get(index).update(state), this.caricatureController.signal);
  }

  destroy() {
    this.controller.abort();
    this.attributions.destroy();
    this.caricatureController?.abort();
  }
}

function weightsPanel(app, state, signal) {
  const panel = h('div', {class: 'weights-panel'}, h('p', {class: 'muted', text: 'loading…'}));
  const params = {run: state.run, step: state.step, node: state.node, unit: state.unit, top: 12};
  const earlier = app.nodes.slice(0, app.nodes.findIndex((n) => n.name === state.node));
  let show;
  const shown = (data) => {
    const biggest = Math.max(...data.connections.map((c) => Math.abs(c.strength)), 1e-12);
    const sourceNode = app.nodes.find((n) => n.name === data.source);
    const picker = select(earlier.map((n) => [n.name, n.name]), data.source, show,
      {'aria-label': 'source node'});
    const thumbs = new Map();
    const rows = data.connections.map((c) => {
      const thumb = new UnitCell(null, {className: 'thumb'});
      thumbs.set(c.unit, thumb);
      const link = h('a', {class: 'address', href: app.link({node: c.node, unit: c.unit}),
        text: `${c.node}:${c.unit}`, onclick: (event) => {
          event.preventDefault();
          app.navigate({node: c.node, unit: c.unit});
        }});
      const bar = h('span', {class: `bar ${c.strength < 0 ? 'negative' : 'positive'}`,
        style: `width:${(100 * Math.abs(c.strength) / biggest).toFixed(1)}%`});
      return h('div', {class: 'connection'}, thumb.el, link,
        h('span', {class: 'bar-track'}, bar), h('span', {class: 'value',
          text: c.strength.toFixed(3)}));
    });
    watchUnits(app.group(state.run, state.step, data.source, 'channel'),
      [...thumbs.keys()], 1, (unit, thumbState) => thumbs.get(unit).update(thumbState), signal);
    panel.replaceChildren(
      h('p', {}, 'strongest inputs from ', picker,
        ` (${sourceNode ? sourceNode.units : '?'} units): expanded weights, signed`),
      ...rows);
  };
  show = (source) => {
    const note = h('p', {class: 'muted', text: 'loading…'});
    panel.replaceChildren(note);
    getResult('weights', {...params, source}, signal, waiting(note)).then(shown)
      .catch((error) => {
        if (!signal.aborted) panel.replaceChildren(errorBox(error.message));
      });
  };
  show(undefined);
  return panel;
}

// One unit's image (or diversity's four) at a step of a run.
export class UnitImage {
  constructor(app, run, node, unit, technique, step) {
    Object.assign(this, {app, run, node, unit, technique});
    this.count = app.techniques[technique].images_per_unit;
    this.cell = new UnitCell(null, {className: 'big', full: true});
    this.el = this.cell.el;
    this.show(step);
  }

  show(step) {
    this.controller?.abort();
    this.controller = new AbortController();
    this.cell.reset();
    watchUnits(this.app.group(this.run, step, this.node, this.technique), [this.unit],
      this.count, (unit, state) => this.cell.update(state), this.controller.signal);
  }

  destroy() {
    this.controller.abort();
  }
}

export class UnitView {
  constructor(app, state, node) {
    this.app = app;
    this.node = node;
    const tabs = [...app.unitImageTechniques(node).map((t) => t.name), 'examples', 'weights'];
    this.tabs = h('nav', {class: 'tabs', role: 'tablist'}, tabs.map((name) => h('button', {
      role: 'tab', dataset: {technique: name}, text: name.replace('_', ' '),
      onclick: () => app.navigate({technique: name}),
    })));
    const unitLink = (unit, text) => h('button', {
      text, disabled: unit < 0 || unit >= node.units, onclick: () => app.navigate({unit}),
    });
    this.address = h('span', {class: 'address'});
    this.main = h('div', {class: 'technique-panel'});
    const filmTechnique = app.techniques[state.technique]?.image ? state.technique : 'channel';
    this.filmstrip = new Filmstrip(app, state, filmTechnique);
    this.evolution = new Evolution(app, state);
    this.el = h('section', {class: 'unit-view'},
      h('div', {class: 'view-head'}, h('h2', {}, this.address),
        h('span', {class: 'muted', text: `of ${node.units} units`}),
        unitLink(state.unit - 1, '← previous unit'), unitLink(state.unit + 1, 'next unit →')),
      this.tabs, h('div', {class: 'unit-body'}, this.main,
        h('div', {class: 'over-training'}, this.filmstrip.el, this.evolution.el)));
    this.filmTechnique = filmTechnique;
    this.update(state);
  }

  update(state) {
    const filmTechnique = this.app.techniques[state.technique]?.image ? state.technique : 'channel';
    if (filmTechnique !== this.filmTechnique) return false;  // a new filmstrip: build anew
    this.address.textContent = `${state.run}@${state.step}/${state.node}:${state.unit}`;
    for (const tab of this.tabs.children) {
      tab.setAttribute('aria-selected', String(tab.dataset.technique === state.technique));
    }
    this.filmstrip.mark(state.step);
    this.evolution.draw(state.step);
    this.controller?.abort();
    this.controller = new AbortController();
    this.image?.destroy();
    this.image = null;
    this.examples?.destroy();
    this.examples = null;
    const signal = this.controller.signal;
    let panel;
    if (state.technique === 'examples') {
      this.examplesOptions ??= examplesOptions(this.app);
      this.examples = new ExamplesPanel(this.app, state, this.examplesOptions);
      panel = this.examples.el;
    } else if (state.technique === 'weights') panel = weightsPanel(this.app, state, signal);
    else {
      this.image = new UnitImage(this.app, state.run, state.node, state.unit, state.technique,
        state.step);
      panel = this.image.el;
    }
    this.main.replaceChildren(panel);
    return true;
  }

  destroy() {
    this.controller?.abort();
    this.image?.destroy();
    this.examples?.destroy();
    this.filmstrip.destroy();
    this.evolution.destroy();
  }
}
