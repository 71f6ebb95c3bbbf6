// Dynamics over training: heatmaps of how close each node (model page) or unit (node view) is to
// its form at the last logged step. The figures come from the dynamics route, computed on the
// server's workers from snapshots and probe images (no rendering).

import {getResult, route} from './api.js';
import {h} from './dom.js';

// A value in [lo, 1] as a colour: pale yellow (far from its final form) through teal to deep
// blue (settled); null (a unit or node that does not vary on the probe images) is grey.
const STOPS = [[255, 247, 188], [65, 182, 196], [37, 52, 148]];

export function heatColour(value, lo = 0) {
  if (value === null || value === undefined) return 'rgb(160,160,160)';
  const t = Math.max(0, Math.min(1, (value - lo) / (1 - lo || 1))) * (STOPS.length - 1);
  const i = Math.min(Math.floor(t), STOPS.length - 2);
  const c = STOPS[i].map((f, k) => Math.round(f + (STOPS[i + 1][k] - f) * (t - i)));
  return `rgb(${c.join(',')})`;
}

// The bottom of the colour scale: 0, or for figures that all lie higher, the tenth below the
// lowest, so that the differences between them show.
export function scaleFloor(rows) {
  const values = rows.flat().filter((v) => v !== null && v !== undefined);
  if (!values.length) return 0;
  return Math.max(0, Math.min(0.9, Math.floor(Math.min(...values) * 10) / 10));
}

export function legend(text, lo = 0) {
  const bar = h('span', {class: 'heat-scale'});
  bar.style.background = `linear-gradient(to right, ${heatColour(lo, lo)}, `
    + `${heatColour((lo + 1) / 2, lo)}, ${heatColour(1, lo)})`;
  return h('div', {class: 'heat-legend muted'}, h('span', {text: `${lo <= 0 ? 0 : lo.toFixed(1)}`
    + `${lo > 0 ? ' or less' : ''}`}), bar, h('span', {text: '1'}), h('span', {text}),
  h('span', {class: 'heat-none'}), h('span', {text: 'no variation'}));
}

function fmt(value) {
  return value === null || value === undefined ? 'n/a' : value.toFixed(3);
}

// A grid of cells on one canvas (rows x columns of values), with a readout of the cell under the
// pointer; onPick(row, column) when a cell is clicked. Its data attributes (rows, columns, cell
// width and height) say where each cell is, so that a cell can be aimed at.
export class Heatmap {
  constructor(values, {cellWidth, cellHeight, describe, onPick, lo = 0, className = ''}) {
    Object.assign(this, {values, cellWidth, cellHeight, describe, onPick, lo});
    const rows = values.length, columns = values[0]?.length ?? 0;
    this.canvas = h('canvas', {class: `heatmap ${className}`, role: 'img',
      'aria-label': 'heatmap', dataset: {rows, columns, cellWidth, cellHeight}});
    this.canvas.width = columns * cellWidth;
    this.canvas.height = rows * cellHeight;
    this.readout = h('div', {class: 'heat-readout muted', text: ' '});
    this.el = h('div', {class: 'heat'}, this.canvas);
    this.canvas.addEventListener('mousemove', (event) => {
      const at = this.cellAt(event);
      this.readout.textContent = at ? describe(...at) : ' ';
      this.canvas.title = at ? describe(...at) : '';
    });
    this.canvas.addEventListener('click', (event) => {
      const at = this.cellAt(event);
      if (at && onPick) onPick(...at);
    });
    this.draw();
  }

  cellAt(event) {
    const box = this.canvas.getBoundingClientRect();
    const scaleX = this.canvas.width / box.width, scaleY = this.canvas.height / box.height;
    const column = Math.floor(((event.clientX - box.left) * scaleX) / this.cellWidth);
    const row = Math.floor(((event.clientY - box.top) * scaleY) / this.cellHeight);
    if (row < 0 || row >= this.values.length || column < 0
      || column >= (this.values[0]?.length ?? 0)) return null;
    return [row, column];
  }

  draw() {
    const context = this.canvas.getContext('2d');
    const gap = this.cellWidth > 6 && this.cellHeight > 6 ? 1 : 0;
    this.values.forEach((row, r) => row.forEach((value, c) => {
      context.fillStyle = heatColour(value, this.lo);
      context.fillRect(c * this.cellWidth, r * this.cellHeight, this.cellWidth - gap,
        this.cellHeight - gap);
    }));
  }
}

// The dynamics route's answer for a run (every node) or a node, with a line saying how far the
// computation is while it waits.
export function loadDynamics(run, node, signal, status) {
  return getResult('dynamics', {run, node}, signal, (wait) => {
    status.textContent = wait.status === 'running' ? 'computing dynamics…'
      : `dynamics queued #${(wait.position ?? 0) + 1}`;
  });
}

// The model page's overview: a row per node (its name, CKA to its final form at each step, and
// thumbnails of its first units at the latest step already rendered); a cell opens that node at
// that step.
export class ModelDynamics {
  constructor(app, run) {
    Object.assign(this, {app, run});
    this.controller = new AbortController();
    this.status = h('p', {class: 'muted', text: 'computing dynamics…'});
    this.body = h('div', {class: 'dynamics-rows'});
    this.el = h('details', {class: 'dynamics model-dynamics', open: true},
      h('summary', {}, h('strong', {text: 'Which layers settle first'}),
        h('span', {class: 'muted', text: ' · linear CKA of each node\'s activations on the '
          + 'probe images with its own at the last step'})),
      this.status, this.body);
    this.load();
  }

  async load() {
    const signal = this.controller.signal;
    let found, thumbs = {};
    try {
      [found, thumbs] = await Promise.all([
        loadDynamics(this.run, undefined, signal, this.status),
        getResult('thumbnails', {run: this.run, count: 4}, signal).catch(() => ({})),
      ]);
    } catch (error) {
      if (!signal.aborted) this.status.textContent = error.message;
      return;
    }
    if (signal.aborted) return;
    const {steps, nodes} = found;
    const cellWidth = Math.max(8, Math.min(28, Math.floor(560 / steps.length)));
    const lo = scaleFloor(found.cka_to_final);
    this.status.replaceChildren(legend(`CKA to step ${steps[steps.length - 1]}; a cell opens `
      + 'the node at that step', lo));
    const axis = h('div', {class: 'dyn-row dyn-axis muted'}, h('span', {class: 'dyn-name'}),
      h('span', {class: 'dyn-steps', style: `width:${cellWidth * steps.length}px`},
        h('span', {text: `step ${steps[0]}`}), h('span', {text: `${steps[steps.length - 1]}`})),
      h('span', {class: 'dyn-thumbs', text: 'first units'}));
    const rows = nodes.map((name, i) => {
      const heat = new Heatmap([found.cka_to_final[i]], {cellWidth, cellHeight: 30, lo,
        describe: (r, c) => `${name} at step ${steps[c]}: CKA to final ${fmt(found.cka_to_final[i][c])}`
          + `, to the step before ${fmt(found.cka_to_previous[i][c])}`,
        onPick: (r, c) => this.app.navigate({node: name, step: steps[c]})});
      const thumb = thumbs[name];
      const images = thumb ? thumb.units.map((unit) => h('img', {class: 'dyn-thumb', alt: '',
        title: `${name}:${unit} at step ${thumb.step}${thumb.quality === 'preview'
          ? ' (preview)' : ''}`,
        src: route('image', {run: this.run, step: thumb.step, node: name, unit,
          technique: 'channel', quality: thumb.quality})})) : [];
      return h('div', {class: 'dyn-row', dataset: {node: name}},
        h('a', {class: 'dyn-name address', href: this.app.link({node: name}), text: name,
          onclick: (event) => {
            event.preventDefault();
            this.app.navigate({node: name});
          }}),
        heat.el, h('span', {class: 'dyn-thumbs'}, ...images),
        heat.readout);
    });
    this.body.replaceChildren(axis, ...rows);
    this.steps = steps;
  }

  // The run's steps now: the heatmap is computed again (new snapshots only) when they changed.
  refresh(steps) {
    if (!this.steps || steps.join() === this.steps.join()) return;
    this.steps = null;
    this.controller.abort();
    this.controller = new AbortController();
    this.load();
  }

  destroy() {
    this.controller.abort();
  }
}

const MAX_HEIGHT = 360;  // px the units heatmap may take on screen
const WIDTH = 200;  // px of steps: it sits under the node's DeepDream

// The node view's units x steps heatmap: each unit's correlation with its own at the last step,
// in unit order or by the step it formed; a cell opens that unit at that step.
export class NodeDynamics {
  constructor(app, run, node, sort) {
    Object.assign(this, {app, run, node, sort});
    this.controller = new AbortController();
    this.status = h('p', {class: 'muted', text: 'computing dynamics…'});
    this.sortSelect = h('select', {id: 'dynamics-sort', 'aria-label': 'sort units',
      onchange: () => app.navigate({sort: this.sortSelect.value === 'formed' ? 'formed' : null},
        true)},
    h('option', {value: 'unit', text: 'unit order'}),
    h('option', {value: 'formed', text: 'formation step'}));
    this.sortSelect.value = sort === 'formed' ? 'formed' : 'unit';
    this.body = h('div', {class: 'dynamics-body'});
    this.el = h('details', {class: 'dynamics node-dynamics', open: true},
      h('summary', {title: 'each unit\'s correlation with its own at the last step, on the '
        + 'probe images'}, h('strong', {text: 'Units over training'})),
      h('div', {class: 'dyn-tools'}, h('label', {class: 'control'}, 'sort by ',
        this.sortSelect), this.status), this.body);
    this.load();
  }

  async load() {
    const signal = this.controller.signal;
    try {
      this.found = await loadDynamics(this.run, this.node.name, signal, this.status);
    } catch (error) {
      if (!signal.aborted) this.status.textContent = error.message;
      return;
    }
    if (!signal.aborted) this.draw();
  }

  order() {
    const units = [...this.found.formed_step.keys()];
    if (this.sort !== 'formed') return units;
    const last = Infinity;
    return units.sort((a, b) => (this.found.formed_step[a] ?? last)
      - (this.found.formed_step[b] ?? last) || a - b);
  }

  draw() {
    const {steps, unit_correlation: correlation, formed_step: formed} = this.found;
    const order = this.order();
    const formedCount = formed.filter((s) => s !== null).length;
    const lo = scaleFloor([...correlation, this.found.cka_to_final]);
    this.status.replaceChildren(legend(`correlation with step ${steps[steps.length - 1]}; `
      + `${formedCount} of ${formed.length} units formed (stay ≥ ${this.found.threshold})`, lo));
    const cellWidth = Math.max(2, Math.min(28, Math.floor(WIDTH / steps.length)));
    const cellHeight = Math.max(1, Math.min(6, Math.floor(240 / order.length)));
    const heat = new Heatmap(order.map((u) => correlation[u]), {cellWidth, cellHeight, lo,
      className: 'units-heat',
      describe: (r, c) => `unit ${order[r]} at step ${steps[c]}: correlation with its last form `
        + `${fmt(correlation[order[r]][c])}; formed ${formed[order[r]] ?? 'never'}`,
      onPick: (r, c) => this.app.navigate({unit: order[r], step: steps[c]})});
    heat.canvas.dataset.order = order.join(',');
    if (order.length * cellHeight > MAX_HEIGHT) {  // many units: squeezed to fit, rows blend
      heat.canvas.style.height = `${MAX_HEIGHT}px`;
      heat.canvas.style.width = `${heat.canvas.width}px`;
    }
    const cka = new Heatmap([this.found.cka_to_final], {cellWidth, cellHeight: 12, lo,
      className: 'cka-strip',
      describe: (r, c) => `the node at step ${steps[c]}: CKA to final `
        + `${fmt(this.found.cka_to_final[c])}`,
      onPick: (r, c) => this.app.navigate({step: steps[c]})});
    this.body.replaceChildren(
      h('div', {class: 'muted dyn-label', text: 'the node\'s CKA to its last step'}), cka.el,
      h('div', {class: 'muted dyn-label', text: `${order.length} units`}), heat.el,
      h('div', {class: 'dyn-axis muted', style: `width:${cellWidth * steps.length}px`},
        h('span', {text: `step ${steps[0]}`}), h('span', {text: `${steps[steps.length - 1]}`})),
      heat.readout, cka.readout);
  }

  refresh(steps) {
    if (!this.found || steps.join() === this.found.steps.join()) return;
    this.found = null;
    this.controller.abort();
    this.controller = new AbortController();
    this.load();
  }

  update(sort) {
    if (sort === this.sort) return;
    this.sort = sort;
    this.sortSelect.value = sort === 'formed' ? 'formed' : 'unit';
    if (this.found) this.draw();
  }

  destroy() {
    this.controller.abort();
  }
}
