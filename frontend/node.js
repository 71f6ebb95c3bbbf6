// The node view: a grid of the node's units at one step, rendered as they come into sight, and
// the node's DeepDream. Moving the step keeps the grid and swaps the images in place.

import {watchUnits} from './api.js';
import {errorBox, h, layoutText, select, UnitCell} from './dom.js';
import {NodeDynamics} from './dynamics.js';

// The units of one node at one step, each cell asking for its image once it is on screen.
// `order`: the units to show, in this order (default: all, by number); `caption(unit)`: a cell's
// caption (default: its number).
export class NodeGrid {
  constructor(app, run, node, technique, step, {order, caption} = {}) {
    Object.assign(this, {app, run, node, technique});
    this.cells = new Map();
    this.visible = new Set();
    this.grid = h('div', {class: 'grid'});
    this.failures = h('div', {class: 'failures'});
    this.el = h('div', {class: 'node-grid'}, this.failures, this.grid);
    for (const unit of order ?? [...Array(node.units).keys()]) {
      const cell = new UnitCell(caption ? caption(unit) : String(unit), {
        href: app.link({run, node: node.name, unit}),
        onclick: (event) => {
          event.preventDefault();
          app.navigate({run, node: node.name, unit, compare: false});
        },
      });
      cell.el.dataset.unit = unit;
      this.cells.set(unit, cell);
      this.grid.append(cell.el);
    }
    this.observer = new IntersectionObserver((entries) => {
      for (const entry of entries) {
        const unit = Number(entry.target.dataset.unit);
        if (entry.isIntersecting) this.visible.add(unit);
        else this.visible.delete(unit);
      }
      this.request();
    }, {rootMargin: '256px'});
    this.cells.forEach((cell) => this.observer.observe(cell.el));
    this.show(step);
  }

  show(step, technique = this.technique) {
    this.controller?.abort();
    this.controller = new AbortController();
    Object.assign(this, {step, technique});
    this.requested = new Set();
    this.failed = new Map();  // message -> units
    this.failures.replaceChildren();
    this.cells.forEach((cell) => cell.reset());
    this.request();
  }

  // Failures are said once above the grid (the cells say only their kind): often every unit of
  // a step fails for one reason, a corrupt snapshot say.
  update(unit, state) {
    this.cells.get(unit).update(state);
    if (state.status !== 'failed') return;
    this.failed.set(state.error, [...(this.failed.get(state.error) || []), unit]);
    this.failures.replaceChildren(...[...this.failed].map(([message, units]) => errorBox(
      `${units.length === 1 ? `unit ${units[0]} failed` : `${units.length} units failed`} `
      + `to render: ${message}`)));
  }

  // Ask for the visible units not yet asked for at this step: one render group, one POST a poll.
  request() {
    const units = [...this.visible].filter((unit) => !this.requested.has(unit)).sort((a, b) => a - b);
    if (!units.length) return;
    units.forEach((unit) => this.requested.add(unit));
    const group = this.app.group(this.run, this.step, this.node.name, this.technique);
    watchUnits(group, units, 1, (unit, state) => this.update(unit, state), this.controller.signal);
  }

  destroy() {
    this.controller.abort();
    this.observer.disconnect();
  }
}

// The head of a node's views: its name and shape, the switch between its units, its atlas and
// its concepts (both need the run's probe images), and the view's own `controls`.
export function nodeHead(app, node, current, ...controls) {
  const probe = Boolean(app.run.probe);
  const view = (name, patch, title) => h('button', {class: 'view-switch', id: `view-${name}`,
    text: name, title, 'aria-pressed': String(current === name),
    disabled: name !== 'units' && !probe,
    onclick: () => current !== name && app.navigate(patch)});
  const away = {concepts: null, concept: null, method: null, count: null, reference: null};
  return h('div', {class: 'view-head'},
    h('h2', {}, h('span', {class: 'address', text: node.name})),
    h('span', {class: 'muted',
      text: `${node.module} · ${node.units} units · ${layoutText(node)} ${node.shape.join('×')}`}),
    h('span', {class: 'switch', role: 'group', 'aria-label': 'view of the node'},
      view('units', {atlas: null, ...away}, 'each unit\'s picture'),
      view('atlas', {atlas: true, ...away}, probe
        ? 'an activation atlas: the space the units span together, on the probe images'
        : 'an atlas is made of probe images: log the run with tb_microscope.Logger(..., '
          + 'probe=images)'),
      view('concepts', {concepts: true, atlas: null}, probe
        ? 'concepts: directions of the node\'s activation space found by a dictionary fitted to '
          + 'its activations on the probe images, each drawn as a picture'
        : 'concepts are fitted to probe images: log the run with tb_microscope.Logger(..., '
          + 'probe=images)')),
    ...controls);
}

export class NodeView {
  constructor(app, state, node) {
    this.app = app;
    const techniques = app.unitImageTechniques(node)
      .map((t) => [t.name, t.name.replace('_', ' ')]);
    this.techniqueSelect = select(techniques, state.technique,
      (technique) => app.navigate({technique}), {id: 'technique', 'aria-label': 'technique'});
    this.grid = new NodeGrid(app, state.run, node, state.technique, state.step);
    this.dream = new UnitCell('DeepDream of the node', {className: 'dream'});
    this.dynamics = app.run.probe ? new NodeDynamics(app, state.run, node, state.sort) : null;
    this.el = h('section', {class: 'node-view'},
      nodeHead(app, node, 'units', h('label', {class: 'control'}, 'technique ',
        this.techniqueSelect)),
      h('div', {class: 'node-body'}, h('aside', {}, this.dream.el, this.dynamics?.el),
        this.grid.el));
    this.showDream(state.step);
  }

  showDream(step) {
    this.dreamController?.abort();
    this.dreamController = new AbortController();
    this.dream.reset();
    const group = this.app.group(this.grid.run, step, this.grid.node.name, 'deepdream');
    watchUnits(group, [0], 1, (unit, state) => this.dream.update(state),
      this.dreamController.signal);
  }

  update(state) {
    this.techniqueSelect.value = state.technique;
    this.dynamics?.update(state.sort);
    if (state.step !== this.grid.step) this.showDream(state.step);
    if (state.step !== this.grid.step || state.technique !== this.grid.technique) {
      this.grid.show(state.step, state.technique);
    }
    return true;
  }

  refresh(run) {
    this.dynamics?.refresh(run.steps);
  }

  destroy() {
    this.grid.destroy();
    this.dynamics?.destroy();
    this.dreamController.abort();
  }
}
