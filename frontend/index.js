// The Microscope tab. TensorBoard loads this ES module in the plugin's iframe and calls render().
//
// Views, picked by what the URL names: the model (a run's nodes and edges), a node (the grid of
// its units at a step, its activation atlas, or its concepts), a concept (its picture, examples
// and filmstrip), a unit (its techniques, filmstrip and
// evolution), and compare (two panes).
// Everything the tab shows comes from the plugin's routes; nothing is loaded from other hosts.

import {getJson} from './api.js';
import {errorBox, h, select, StepSlider} from './dom.js';
import {host, isOurTab, readState, stateHash, writeState} from './state.js';
import {AtlasView, DEFAULT_GRID, GRID_RANGE} from './atlas.js';
import {CompareView} from './compare.js';
import {ConceptsView, ConceptView, conceptsMethod, defaultCount, maxCount, METHODS}
  from './concepts.js';
import {modelView} from './model.js';
import {NodeView} from './node.js';
import {UnitView} from './unit.js';

const REFRESH_MS = 5000;  // new runs and snapshots appear without a reload
// What leaving a node's concepts forgets.
const NO_CONCEPTS = {concepts: null, concept: null, method: null, count: null, reference: null};

function listNames(names, limit = 12) {
  if (names.length <= limit) return names.join(', ');
  const half = limit / 2;
  return `${names.slice(0, half).join(', ')} … ${names.slice(-half).join(', ')} `
    + `(${names.length} in all)`;
}

class App {
  constructor(root) {
    this.seq = 0;
    this.nodeLists = new Map();
    this.runSelect = select([], '', (run) => this.navigate({run, step: null, node: null,
      unit: null, compare: false, atlas: null, ...NO_CONCEPTS}), {id: 'run', 'aria-label': 'run'});
    this.slider = new StepSlider((step) => this.navigate({step}, true),
      (step) => this.navigate({step}), 'step');
    this.crumbs = h('nav', {class: 'crumbs', 'aria-label': 'view'});
    this.compareButton = h('button', {id: 'compare', text: 'compare',
      title: 'show this node or unit side by side at another step or in another run',
      onclick: () => this.navigate({compare: !this.state.compare})});
    this.bands = h('span', {class: 'control bands', hidden: true});
    this.header = h('header', {},
      h('strong', {class: 'brand', text: 'Microscope'}),
      h('label', {class: 'control'}, 'run ', this.runSelect),
      this.crumbs, this.slider.el, this.bands, this.compareButton,
      h('span', {class: 'keys muted', text: '←→ step  ↑↓ unit  Esc up  Space play'}));
    this.main = h('main', {});
    root.append(this.header, this.main);
  }

  async start() {
    const [runs, techniques, settings] = await Promise.all([getJson('runs'),
      getJson('techniques'), getJson('settings')]);
    this.runs = runs;
    this.settings = settings;
    this.techniques = Object.fromEntries(techniques.map((t) => [t.name, t]));
    host.addEventListener('hashchange', () => this.update());
    document.addEventListener('keydown', (event) => this.onKey(event));
    setInterval(() => this.refreshRuns(), REFRESH_MS);
    await this.update();
  }

  // --- what views use ----------------------------------------------------------------------
  runInfo(name) {
    return this.runs.find((r) => r.run === name);
  }

  nodesOf(run) {
    if (!this.nodeLists.has(run)) {
      const request = getJson('nodes', {run});
      request.catch(() => this.nodeLists.delete(run));
      this.nodeLists.set(run, request);
    }
    return this.nodeLists.get(run);
  }

  // The techniques that draw a unit's image on `node` (class token: a node of tokens with one);
  // not a caricature, which draws probe images (the examples tab shows it).
  unitImageTechniques(node) {
    return Object.values(this.techniques).filter((t) => t.image && !t.whole_node
      && !t.probe_images && (!t.class_token || (node?.layout === 'tokens' && node.prefix > 0)));
  }

  // What names one render group: run, step, node and technique, and for a run of more than
  // three input channels the three shown as RGB.
  group(run, step, node, technique) {
    const group = {run, step, node, technique};
    if (this.channels(run) > 3 && this.state?.bands) group.bands = this.state.bands;
    return group;
  }

  channels(run) {
    return this.runInfo(run)?.input.shape[0] ?? 3;
  }

  validBands(run, bands) {
    const parts = String(bands).split(',');
    return parts.length === 3 && parts.every((b) => /^\d+$/.test(b) && Number(b) < this.channels(run));
  }

  // Why `node` and `unit` cannot be shown in `run`, or null when they can.
  checkUnit(run, nodes, node, unit) {
    if (node === undefined) return null;
    const found = nodes.find((n) => n.name === node);
    if (!found) {
      return `node '${node}' is not in run '${run}'; nodes: ${listNames(nodes.map((n) => n.name))}`;
    }
    if (unit !== undefined && !(Number.isInteger(unit) && unit >= 0 && unit < found.units)) {
      return `unit ${unit} is out of range for node '${node}', which has ${found.units} units `
        + `(0 … ${found.units - 1})`;
    }
    return null;
  }

  // The state after `patch`: picking a node forgets the unit unless the patch names one.
  next(patch) {
    const state = {...(this.state || readState()), ...patch};
    if ('node' in patch && !('unit' in patch)) state.unit = null;
    if ('node' in patch && !('concept' in patch)) state.concept = null;
    for (const key of Object.keys(state)) if (state[key] === null) delete state[key];
    return state;
  }

  link(patch) {
    return host.location.href.split('#')[0] + stateHash(this.next(patch));
  }

  navigate(patch, replace = false) {
    writeState(this.next(patch), replace);
    this.update();
  }

  // --- state -------------------------------------------------------------------------------
  // The URL's state with defaults filled in, or an Error saying what in it cannot be shown.
  async resolve(wanted) {
    const state = {technique: 'channel', ...wanted};
    const usable = this.runs.filter((r) => !r.error);
    if (!this.runs.length) {
      throw new Error('No run in this log directory holds tb_microscope data yet. Log one with '
        + 'tb_microscope.Logger (see the README), or run `tb-microscope demo`.');
    }
    state.run ??= (usable[0] || this.runs[0]).run;
    const run = this.runInfo(state.run);
    if (!run) {
      throw new Error(`run '${state.run}' has no tb_microscope data; runs: `
        + `${listNames(this.runs.map((r) => r.run))}`);
    }
    if (run.error) throw new Error(run.error);
    if (!run.steps.length) throw new Error(`run '${state.run}' has no snapshots yet`);
    state.step ??= run.steps[run.steps.length - 1];
    if (!run.steps.includes(state.step)) {
      throw new Error(`step ${state.step} is not logged in run '${state.run}'; steps: `
        + `${listNames(run.steps.map(String), 20)}`);
    }
    const {nodes, edges} = await this.nodesOf(state.run);
    const message = this.checkUnit(state.run, nodes, state.node, state.unit);
    if (message) throw new Error(message);
    const technique = this.techniques[state.technique];
    const node = nodes.find((n) => n.name === state.node);
    const shown = [...this.unitImageTechniques(node).map((t) => t.name), 'examples', 'weights'];
    if (!technique || !shown.includes(state.technique)) {
      throw new Error(`technique '${state.technique}' is not one the tab shows`
        + `${node ? ` for node '${node.name}'` : ''}; techniques: ${shown.join(', ')}`);
    }
    if (!technique.image && state.unit === undefined) state.technique = 'channel';  // grids draw
    if (state.bands !== undefined && !this.validBands(state.run, state.bands)) {
      throw new Error(`bands '${state.bands}' are not three of run '${state.run}'s `
        + `${this.channels(state.run)} input channels (0 to ${this.channels(state.run) - 1})`);
    }
    if (state.atlas) {
      if (state.node === undefined) throw new Error('pick a node to see its activation atlas');
      if (!run.probe) {
        throw new Error(`run '${state.run}' has no probe images, which an activation atlas is `
          + 'made of; log it with tb_microscope.Logger(..., probe=images) (a few hundred '
          + 'training inputs)');
      }
    }
    if (state.grid !== undefined && !(Number.isInteger(state.grid)
      && state.grid >= GRID_RANGE[0] && state.grid <= GRID_RANGE[1])) {
      throw new Error(`grid '${state.grid}' is not a number of atlas cells a side from `
        + `${GRID_RANGE[0]} to ${GRID_RANGE[1]}`);
    }
    if (state.grid === DEFAULT_GRID) delete state.grid;
    if (state.concepts) this.checkConcepts(state, run, node);
    else for (const key of ['concept', 'method', 'count', 'reference']) delete state[key];
    if (state.compare) {
      if (state.node === undefined) throw new Error('pick a node or a unit to compare');
      if (!technique.image) state.technique = 'channel';  // the panes draw
      state.run2 ??= state.run;
      const other = this.runInfo(state.run2);
      if (!other || other.error || !other.steps.length) {
        throw new Error(`run '${state.run2}' cannot be compared: ${other?.error
          || (other ? 'it has no snapshots yet' : 'it has no tb_microscope data')}`);
      }
      state.step2 ??= other.steps[0] === state.step && other.steps.length > 1
        ? other.steps[1] : other.steps[0];
      if (!other.steps.includes(state.step2)) {
        throw new Error(`step ${state.step2} is not logged in run '${state.run2}'`);
      }
    }
    return {state, run, nodes, edges};
  }

  // What in the URL's concepts cannot be shown, said as an Error.
  checkConcepts(state, run, node) {
    if (node === undefined) throw new Error('pick a node to see its concepts');
    if (!run.probe) {
      throw new Error(`run '${state.run}' has no probe images, which concepts are fitted to; `
        + 'log it with tb_microscope.Logger(..., probe=images) (a few hundred training inputs)');
    }
    if (state.method !== undefined && !METHODS.includes(state.method)) {
      throw new Error(`method '${state.method}' is not one that finds concepts; methods: `
        + `${METHODS.join(', ')}`);
    }
    const method = conceptsMethod(state, node);
    const most = maxCount(this, node, method);
    if (state.count !== undefined && !(Number.isInteger(state.count) && state.count >= 1
      && state.count <= most)) {
      throw new Error(`count '${state.count}' is not a number of concepts from 1 to ${most} `
        + `(method ${method} on node '${node.name}')`);
    }
    const count = state.count ?? defaultCount(node, method);
    if (state.concept !== undefined && !(Number.isInteger(state.concept) && state.concept >= 0
      && state.concept < count)) {
      throw new Error(`concept '${state.concept}' is not one of the ${count} concepts `
        + `(0 … ${count - 1})`);
    }
    if (state.reference !== undefined && !run.steps.includes(state.reference)) {
      throw new Error(`reference step ${state.reference} is not logged in run '${state.run}'`);
    }
  }

  async update() {
    if (!isOurTab()) return;  // another TensorBoard tab is showing; its URL is not ours
    const seq = ++this.seq;
    const wanted = readState();
    if (!Object.keys(wanted).some((key) => !['compare', 'align', 'atlas', 'concepts']
      .includes(key))
      && this.state) {
      writeState(this.state, true);  // back on our tab with a bare #tb_microscope: stay put
      return;
    }
    let resolved;
    try {
      resolved = await this.resolve(wanted);
    } catch (error) {
      if (seq === this.seq) this.showError(wanted, error.message);
      return;
    }
    if (seq !== this.seq) return;
    const {state, run, nodes, edges} = resolved;
    const rendered = JSON.stringify(state);
    if (rendered === this.rendered) return;
    Object.assign(this, {state, run, nodes, edges, rendered});
    writeState(state, true);  // the URL names the defaults it was given, so a link is exact
    this.showHeader();
    const concepts = `${state.run}|${state.node}|${state.method}|${state.count}|${state.reference}`;
    const key = (state.compare ? `compare|${state.node}|${state.unit}|${state.technique}`
      : state.unit !== undefined ? `unit|${state.run}|${state.node}|${state.unit}`
        : state.concepts && state.concept !== undefined ? `concept|${concepts}|${state.concept}`
          : state.concepts ? `concepts|${concepts}`
            : state.node !== undefined && state.atlas ? `atlas|${state.run}|${state.node}|${state.grid}`
              : state.node !== undefined ? `node|${state.run}|${state.node}` : `model|${state.run}`)
      + `|${state.bands ?? ''}`;
    if (this.view?.key === key && this.view.update(state)) return;
    this.view?.destroy();
    const node = nodes.find((n) => n.name === state.node);
    if (state.compare) this.view = new CompareView(this, state);
    else if (state.unit !== undefined) this.view = new UnitView(this, state, node);
    else if (node && state.concepts && state.concept !== undefined) {
      this.view = new ConceptView(this, state, node);
    } else if (node && state.concepts) this.view = new ConceptsView(this, state, node);
    else if (node && state.atlas) this.view = new AtlasView(this, state, node);
    else if (node) this.view = new NodeView(this, state, node);
    else this.view = modelView(this, state);
    this.view.key = key;
    this.main.replaceChildren(this.view.el);
  }

  showError(wanted, message) {
    this.view?.destroy();
    this.view = null;
    this.rendered = null;
    const usable = this.runs.filter((r) => !r.error).map((r) => r.run);
    const run = usable.includes(wanted.run) ? wanted.run : usable[0];
    this.showRuns(this.runInfo(wanted.run) ? wanted.run : run);  // a broken run stays picked
    this.slider.el.hidden = true;
    this.bands.hidden = true;
    this.compareButton.hidden = true;
    this.crumbs.replaceChildren();
    const back = run === undefined ? null : h('p', {}, h('a', {
      href: host.location.href.split('#')[0] + stateHash({run}),
      text: `back to the model of run '${run}'`,
      onclick: (event) => {
        event.preventDefault();
        writeState({run});
        this.update();
      }}));
    this.main.replaceChildren(h('section', {class: 'error-view'}, errorBox(message), back));
  }

  // Runs that cannot be shown stay listed, greyed, with their error as the tooltip; picking
  // one shows the whole message.
  showRuns(current) {
    this.runSelect.replaceChildren(...this.runs.map((r) => h('option', {value: r.run,
      text: r.error ? `${r.run} (cannot be shown)` : r.run, class: r.error ? 'broken' : null,
      title: r.error || null})));
    this.runSelect.value = current ?? '';
  }

  // For a run of more than three input channels: which three are shown as red, green, blue.
  showBands() {
    const channels = this.channels(this.state.run);
    this.bands.hidden = channels <= 3;
    if (channels <= 3) return;
    const chosen = (this.state.bands || '0,1,2').split(',').map(Number);
    const options = [...Array(channels).keys()].map((c) => [String(c), `band ${c}`]);
    const pickers = ['R', 'G', 'B'].map((colour, i) => h('label', {}, ` ${colour} `,
      select(options, String(chosen[i]), (value) => {
        const next = [...chosen];
        next[i] = Number(value);
        this.navigate({bands: next.join(',') === '0,1,2' ? null : next.join(',')});
      }, {'aria-label': `band shown as ${colour}`})));
    this.bands.replaceChildren(h('span', {class: 'muted', text: 'bands'}), ...pickers);
  }

  showHeader() {
    const {state} = this;
    this.showRuns(state.run);
    this.showBands();
    this.slider.el.hidden = false;
    this.slider.set(this.run.steps, state.step);
    const crumb = (text, patch, current) => (current ? h('span', {class: 'address', text})
      : h('a', {href: this.link(patch), text, onclick: (event) => {
        event.preventDefault();
        this.navigate(patch);
      }}));
    const parts = [crumb('model', {node: null, compare: false, atlas: null, ...NO_CONCEPTS},
      state.node === undefined)];
    if (state.node !== undefined) {
      parts.push(' › ', crumb(state.node, state.concepts ? {node: state.node, compare: false,
        ...NO_CONCEPTS} : {node: state.node, compare: false},
      state.unit === undefined && !state.compare && !state.concepts));
    }
    if (state.concepts) {
      parts.push(' › ', crumb('concepts', {unit: null, concept: null, compare: false},
        state.unit === undefined && state.concept === undefined && !state.compare));
    }
    if (state.concepts && state.concept !== undefined) {
      parts.push(' › ', crumb(`concept ${state.concept}`, {unit: null, compare: false},
        state.unit === undefined && !state.compare));
    }
    if (state.unit !== undefined) {
      parts.push(' › ', crumb(`unit ${state.unit}`, {unit: state.unit, compare: false},
        !state.compare));
    }
    if (state.compare) parts.push(' › ', h('span', {class: 'address', text: 'compare'}));
    this.crumbs.replaceChildren(...parts);
    this.compareButton.hidden = state.node === undefined
      || (state.concepts && state.unit === undefined);
    this.compareButton.setAttribute('aria-pressed', String(Boolean(state.compare)));
  }

  async refreshRuns() {
    let runs;
    try {
      runs = await getJson('runs');
    } catch {
      return;  // TensorBoard is restarting or gone; try again next time
    }
    if (JSON.stringify(runs) === JSON.stringify(this.runs)) return;
    this.runs = runs;
    this.run = this.runInfo(this.state?.run) || this.run;
    if (this.state) this.showHeader();
    if (this.run) this.view?.refresh?.(this.run);  // new snapshots: summaries of all steps reload
  }

  // --- keys --------------------------------------------------------------------------------
  onKey(event) {
    const target = event.target;
    if (!this.state || event.altKey || event.ctrlKey || event.metaKey
      || ['INPUT', 'SELECT', 'TEXTAREA'].includes(target.tagName)) return;
    const {state} = this;
    const steps = this.run.steps;
    const index = steps.indexOf(state.step);
    const moves = {
      ArrowLeft: () => index > 0 && {step: steps[index - 1]},
      ArrowRight: () => index < steps.length - 1 && {step: steps[index + 1]},
      ArrowUp: () => state.unit > 0 && {unit: state.unit - 1},
      ArrowDown: () => state.unit !== undefined && state.unit < this.unitCount() - 1
        && {unit: state.unit + 1},
      Escape: () => (state.compare ? {compare: false}
        : state.unit !== undefined ? {unit: null}
          : state.concept !== undefined ? {concept: null, reference: null}
            : state.concepts ? NO_CONCEPTS : state.atlas ? {atlas: null}
          : state.node !== undefined && {node: null}),
    };
    if (event.key === ' ' && this.view instanceof UnitView) {
      event.preventDefault();
      this.view.filmstrip.toggle();
      return;
    }
    const patch = moves[event.key]?.();
    if (moves[event.key]) event.preventDefault();
    if (patch) this.navigate(patch);
  }

  unitCount() {
    return this.nodes.find((n) => n.name === this.state.node)?.units ?? 0;
  }
}

// TensorBoard marks dark mode with a class on its own <body>; the tab follows it (opened on its
// own, it follows the browser's preference).
function followDarkMode() {
  const media = window.matchMedia('(prefers-color-scheme: dark)');
  const apply = () => {
    const dark = host === window ? media.matches
      : host.document.body.classList.contains('dark-mode');
    document.documentElement.classList.toggle('dark', dark);
  };
  apply();
  if (host === window) media.addEventListener('change', apply);
  else new MutationObserver(apply).observe(host.document.body, {attributeFilter: ['class']});
}

export async function render() {
  const style = h('link', {rel: 'stylesheet', href: new URL('./style.css', import.meta.url)});
  const loaded = new Promise((resolve) => style.addEventListener('load', resolve, {once: true}));
  document.head.append(style, h('meta', {name: 'color-scheme', content: 'light dark'}));
  followDarkMode();
  await loaded;
  window.focus();  // so that the keys work as soon as the tab opens
  const app = new App(document.body);
  try {
    await app.start();
  } catch (error) {
    app.main.replaceChildren(errorBox(`The Microscope tab could not start: ${error.message}`));
  }
}
