// The atlas view of a node: its activation atlas (Carter et al., 2019) at the slider's step. The
// node's activations on the probe images are laid out once, at the run's last logged step, and
// every step keeps that layout: moving the slider keeps each cell where it is and swaps its
// picture for what the model at that step makes of the same patches. Pointing at a cell says how
// many activations fall in it and shows its probe images; clicking it pins it and draws the units
// nearest its direction, each a link to the unit.

import {getResult, route, watchUnits} from './api.js';
import {errorBox, h, select, UnitCell} from './dom.js';
import {nodeHead} from './node.js';

export const DEFAULT_GRID = 20;
export const GRID_RANGE = [2, 50];
const GRIDS = [10, 15, 20, 30, 40];
const EXAMPLES = 8;  // probe images shown per cell
const LAID_OUT = 0.1;  // an atlas's progress once its activations are sampled and laid out

function percent(part, whole) {
  const share = (100 * part) / whole;
  return share >= 1 ? `${Math.round(share)}%` : `${share.toFixed(1)}%`;
}

export class AtlasView {
  constructor(app, state, node) {
    Object.assign(this, {app, node, run: state.run, grid: state.grid ?? DEFAULT_GRID});
    // The layout is the last logged step's when the view opened: it stays while new snapshots
    // come in.
    this.layoutStep = app.run.steps[app.run.steps.length - 1];
    this.cells = new Map();  // "row,col" -> the cell, at the step shown
    this.pinned = null;  // [row, col]
    // The grids this server draws (--microscope_max_grid), and the one in the address.
    const most = app.settings.limits?.grid ?? GRID_RANGE[1];
    const grids = [...new Set([...GRIDS.filter((g) => g <= most), this.grid])]
      .sort((a, b) => a - b);
    this.gridSelect = select(grids.map((g) => [String(g), `${g}×${g}`]), String(this.grid),
      (value) => app.navigate({grid: Number(value)}), {id: 'atlas-grid', 'aria-label': 'grid'});
    this.status = h('p', {class: 'muted atlas-status', role: 'status', text: 'waiting'});
    this.picture = h('img', {class: 'atlas-picture', alt: `activation atlas of ${node.name}`,
      hidden: true});
    this.hoverMark = h('div', {class: 'atlas-mark', hidden: true});
    this.pinMark = h('div', {class: 'atlas-mark pinned', hidden: true});
    this.board = h('div', {class: 'atlas-board',
      dataset: {grid: this.grid, layoutStep: this.layoutStep}},
      this.picture, this.hoverMark, this.pinMark);
    this.board.addEventListener('mousemove', (event) => this.point(this.cellAt(event)));
    this.board.addEventListener('mouseleave', () => this.point(null));
    this.board.addEventListener('click', (event) => this.pin(this.cellAt(event)));
    this.panel = h('aside', {class: 'atlas-panel'});
    this.failure = h('div', {});
    this.el = h('section', {class: 'atlas-view'},
      nodeHead(app, node, 'atlas', h('label', {class: 'control'}, 'grid ', this.gridSelect)),
      this.status, this.failure, h('div', {class: 'atlas-body'}, this.board, this.panel));
    this.describe(null);
    this.show(state.step);
  }

  // The atlas at `step`: a preview first where the server draws one, then the full atlas. The
  // pictures shown stay, dimmed, until the new ones arrive.
  async show(step) {
    this.controller?.abort();
    this.controller = new AbortController();
    const signal = this.controller.signal;
    this.step = step;
    this.board.dataset.state = 'loading';
    this.failure.replaceChildren();
    const preview = this.app.settings.atlas?.preview;
    const params = {run: this.run, step, node: this.node.name, grid: this.grid,
      layout_step: this.layoutStep};
    for (const quality of preview ? ['preview', 'full'] : ['full']) {
      const what = quality === 'preview' ? 'a first look' : 'the atlas';
      let found;
      try {
        found = await getResult('atlas', {...params, quality}, signal, (wait) => {
          const progress = wait.progress || 0;
          this.status.textContent = `step ${step}: ${what} ${wait.status !== 'running'
            ? `is queued #${(wait.position ?? 0) + 1}`
            : progress < LAID_OUT ? 'is being computed: sampling and laying out the activations'
              : `is being drawn, ${Math.round(100 * progress)}%`}`;
        });
        if (signal.aborted) return;
        await this.draw(found, quality, signal);
      } catch (error) {
        if (signal.aborted) return;
        this.board.dataset.state = 'failed';
        this.status.textContent = `step ${step}: the atlas could not be computed`;
        this.failure.replaceChildren(errorBox(error.message));
        return;
      }
    }
  }

  async draw(found, quality, signal) {
    const url = route(found.picture);
    const loading = new Image();
    loading.src = url;
    await loading.decode();
    if (signal.aborted) return;
    this.atlas = found;
    this.pictureUrl = url;
    this.cells = new Map(found.cells.map((cell) => [`${cell.row},${cell.col}`, cell]));
    this.picture.src = url;
    this.picture.hidden = false;
    Object.assign(this.board.dataset, {state: quality === 'full' ? 'done' : 'preview',
      step: found.step, quality, cells: found.cells.length});
    const method = found.layout_method === 'umap' ? 'UMAP' : 'PCA';
    this.status.textContent = `step ${found.step}${quality === 'preview' ? ' (a first look; '
      + 'the full atlas is on its way)' : ''} · ${found.cells.length} cells of `
      + `${found.grid}×${found.grid} · ${found.coords.length} activations on the probe images, `
      + `laid out by ${method} at step ${found.layout_step} for every step · point at a cell `
      + 'for its probe images, click it for its units';
    const pinned = this.pinned && this.cells.get(`${this.pinned[0]},${this.pinned[1]}`);
    if (pinned && this.unitsKey !== `${this.step}|${pinned.row},${pinned.col}`) {
      this.showUnits(pinned);  // the units at the new step
    }
    this.describe(this.hovered ?? this.pinned);
  }

  // The grid cell under the pointer, [row, col], or null outside the board.
  cellAt(event) {
    const box = this.board.getBoundingClientRect();
    const col = Math.floor(((event.clientX - box.left) / box.width) * this.grid);
    const row = Math.floor(((event.clientY - box.top) / box.height) * this.grid);
    if (row < 0 || col < 0 || row >= this.grid || col >= this.grid) return null;
    return [row, col];
  }

  mark(el, at) {
    el.hidden = !at;
    if (!at) return;
    const size = 100 / this.grid;
    Object.assign(el.style, {left: `${at[1] * size}%`, top: `${at[0] * size}%`,
      width: `${size}%`, height: `${size}%`});
  }

  // Only when the pointer enters another cell: mousemove fires at every pixel.
  point(at) {
    const hovered = at && this.cells.has(`${at[0]},${at[1]}`) ? at : null;
    if (String(hovered) === String(this.hovered)) return;
    this.hovered = hovered;
    this.mark(this.hoverMark, this.hovered);
    this.board.style.cursor = this.hovered ? 'pointer' : 'default';
    this.describe(this.hovered ?? this.pinned);
  }

  pin(at) {
    const cell = at && this.cells.get(`${at[0]},${at[1]}`);
    this.pinned = cell ? at : null;
    this.mark(this.pinMark, this.pinned);
    this.showUnits(cell);
    this.describe(this.pinned);
  }

  // The side panel: the cell at `at` (its picture, count and probe images), or what to do.
  describe(at) {
    const cell = at && this.cells.get(`${at[0]},${at[1]}`);
    if (!cell) {
      this.panel.dataset.cell = '';
      this.panel.replaceChildren(h('p', {class: 'muted', text: this.atlas
        ? 'Point at a cell: how many of the sampled activations fall in it and the probe '
          + 'images they come from. Click it to pin it and see the units nearest its direction.'
        : 'Each cell of an atlas is the average of the activations laid out there, drawn as a '
          + 'feature visualization.'}));
      return;
    }
    const total = this.atlas.coords.length;
    const tile = h('div', {class: 'atlas-tile', role: 'img',
      'aria-label': `cell ${cell.row}, ${cell.col}`});
    tile.style.backgroundImage = `url("${this.pictureUrl}")`;
    tile.style.backgroundSize = `${this.grid * 100}%`;
    const position = (i) => (this.grid > 1 ? (100 * i) / (this.grid - 1) : 0);
    tile.style.backgroundPosition = `${position(cell.col)}% ${position(cell.row)}%`;
    const bands = this.app.state?.bands;
    const examples = cell.examples.slice(0, EXAMPLES).map((image) => h('img', {
      class: 'atlas-example', alt: `probe image ${image}`, title: `probe image ${image}`,
      src: route('probe', {run: this.run, image, bands})}));
    const pinned = this.pinned && this.pinned[0] === cell.row && this.pinned[1] === cell.col;
    this.panel.dataset.cell = `${cell.row},${cell.col}`;
    this.panel.replaceChildren(
      h('h3', {}, `cell ${cell.row}, ${cell.col}`,
        pinned ? h('span', {class: 'muted', text: ' · pinned'}) : null),
      tile,
      h('p', {class: 'atlas-count', text: `${cell.count} of ${total} activations `
        + `(${percent(cell.count, total)}) from ${cell.examples.length} probe image`
        + `${cell.examples.length === 1 ? '' : 's'}`}),
      h('div', {class: 'muted atlas-label', text: 'probe images, most typical first'}),
      h('div', {class: 'atlas-examples'}, ...examples),
      h('div', {class: 'muted atlas-label', text: 'units nearest its direction'}),
      pinned ? this.unitsBox : h('p', {class: 'muted', text: `${cell.units.join(', ')} · `
        + 'click the cell to see them'}));
  }

  // The pinned cell's nearest units, drawn at the step shown, each opening its unit. They go on
  // rendering while the pointer visits other cells.
  showUnits(cell) {
    this.unitsController?.abort();
    this.unitsBox = h('div', {class: 'atlas-units'});
    this.unitsKey = cell ? `${this.step}|${cell.row},${cell.col}` : null;
    if (!cell) return;
    this.unitsController = new AbortController();
    const shown = new Map(cell.units.map((unit) => [unit, new UnitCell(`unit ${unit}`, {
      className: 'atlas-unit',
      href: this.app.link({unit}),
      onclick: (event) => {
        event.preventDefault();
        this.app.navigate({unit});
      }})]));
    shown.forEach((unitCell, unit) => {
      unitCell.el.dataset.unit = unit;
    });
    this.unitsBox.replaceChildren(...[...shown.values()].map((unitCell) => unitCell.el));
    const group = this.app.group(this.run, this.step, this.node.name, 'channel');
    watchUnits(group, cell.units, 1, (unit, state) => shown.get(unit).update(state),
      this.unitsController.signal);
  }

  update(state) {
    if (state.step !== this.step) this.show(state.step);
    return true;
  }

  destroy() {
    this.controller?.abort();
    this.unitsController?.abort();
  }
}
