// Small DOM helpers and the widgets the views share: a unit's image cell, the step slider, a
// select, a line chart, and attribution over dataset examples (a unit's or a concept's).

// h('div', {class: 'x', onclick: f}, child, 'text', ...): an element with attributes and children.
export function h(tag, attrs = {}, ...children) {
  const svg = ['svg', 'path', 'line', 'text', 'circle', 'title'].includes(tag);
  const el = svg ? document.createElementNS('http://www.w3.org/2000/svg', tag)
    : document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith('on')) el.addEventListener(key.slice(2), value);
    else if (key === 'text') el.textContent = value;
    else if (key === 'dataset') Object.assign(el.dataset, value);
    else el.setAttribute(key, value === true ? '' : value);
  }
  el.append(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
  return el;
}

const LAYOUTS = {
  channels_first: 'C×H×W',
  channels_last: 'H×W×C',
  tokens: 'tokens',
  vector: 'vector',
};

// How a node's output is laid out, in a few characters ("tokens +1": one leading token).
export function layoutText(node) {
  if (node.layout === 'tokens' && node.prefix) return `tokens +${node.prefix}`;
  return LAYOUTS[node.layout] || node.layout || node.kind;
}

export function errorBox(message) {
  return h('div', {class: 'error', role: 'alert', text: message});
}

export function select(options, value, onChange, attrs = {}) {
  const el = h('select', {...attrs, onchange: () => onChange(el.value)},
    options.map(([optionValue, label]) => h('option', {value: optionValue, text: label})));
  el.value = value;
  return el;
}

// A slider over the logged steps (by index: steps are dense early, sparse later). onInput while
// dragging, onChange once it is let go.
export class StepSlider {
  constructor(onInput, onChange, id) {
    this.steps = [];
    this.input = h('input', {type: 'range', min: 0, max: 0, step: 1, id, 'aria-label': 'step'});
    this.label = h('output', {class: 'step-label'});
    this.input.addEventListener('input', () => onInput(this.value));
    this.input.addEventListener('change', () => onChange(this.value));
    this.el = h('span', {class: 'step-slider'}, h('span', {class: 'muted', text: 'step'}),
      this.input, this.label);
  }

  get value() {
    return this.steps[Number(this.input.value)];
  }

  set(steps, step) {
    this.steps = steps;
    this.input.max = Math.max(steps.length - 1, 0);
    this.input.value = Math.max(steps.indexOf(step), 0);
    this.label.textContent = `${step} (${steps.indexOf(step) + 1}/${steps.length})`;
  }
}

// The kind of a failure ("CorruptSnapshotError: the snapshot ..." -> "CorruptSnapshotError"), short
// enough for a small cell; the whole message is the cell's tooltip.
function failureKind(error) {
  const kind = /^([A-Za-z]+Error):/.exec(error);
  return kind ? kind[1] : error.length > 40 ? `${error.slice(0, 40)}…` : error;
}

function stateText(state, full) {
  if (state.status === 'queued') {
    return (state.previewUrls ? 'preview · ' : '')
      + (state.position === null || state.position === undefined ? 'queued'
        : `queued #${state.position + 1}`);
  }
  if (state.status === 'running') {
    return `${state.previewUrls ? 'preview · ' : ''}rendering ${Math.round(100 * (state.progress || 0))}%`;
  }
  if (state.status === 'failed') return `failed: ${full ? state.error : failureKind(state.error)}`;
  return '';
}

// One image of a unit (or several, for diversity) with its render state shown until it arrives.
// While a new step renders, the previous image stays, dimmed, so scrubbing does not flash.
export class UnitCell {
  // `full`: the cell is big enough to show a failure's whole message.
  constructor(caption, {onclick, href, className = '', full = false} = {}) {
    this.full = full;
    this.images = h('div', {class: 'images'});
    this.state = h('div', {class: 'state', text: 'waiting'});
    this.el = h(href ? 'a' : 'figure', {class: `cell ${className}`, href, onclick},
      h('div', {class: 'frame'}, this.images, this.state),
      caption === null ? null : h('figcaption', {}, caption));
    this.el.dataset.status = 'waiting';
  }

  // A preview (state.previewUrls, while the full render is queued or running) is shown with a
  // "preview" mark until the full image replaces it.
  update(state) {
    this.el.dataset.status = state.status;
    this.el.title = state.status === 'failed' ? state.error : '';
    this.state.textContent = stateText(state, this.full);
    const urls = state.status === 'done' ? state.urls : state.previewUrls;
    if (urls) {
      this.images.replaceChildren(...urls.map((src) => h('img', {src, alt: ''})));
      this.el.dataset.quality = state.status === 'done' ? 'full' : 'preview';
      if (state.status !== 'done') this.el.dataset.previewed = 'true';
    }
  }

  reset() {
    this.el.dataset.status = this.images.children.length ? 'stale' : 'waiting';
    delete this.el.dataset.quality;
    delete this.el.dataset.previewed;
    this.state.textContent = '';
  }
}

// A line chart of series [{name, values, className}] over evenly spaced x labels, with the
// value range [lo, hi]; `marker` is the x index to highlight. Missing values leave gaps.
export function lineChart(labels, series, {lo, hi, marker, onPick} = {}) {
  const width = 560, height = 160, left = 36, right = 20, top = 8, bottom = 24;
  const x = (i) => left + (labels.length > 1 ? i / (labels.length - 1) : 0.5) * (width - left - right);
  const y = (v) => top + (1 - (v - lo) / (hi - lo || 1)) * (height - top - bottom);
  const svg = h('svg', {viewBox: `0 0 ${width} ${height}`, class: 'chart', role: 'img'});
  for (const tick of [lo, (lo + hi) / 2, hi]) {
    svg.append(h('line', {x1: left, x2: width - right, y1: y(tick), y2: y(tick), class: 'gridline'}),
      h('text', {x: left - 4, y: y(tick) + 4, class: 'tick', 'text-anchor': 'end',
        text: Number(tick.toFixed(2)).toString()}));
  }
  const every = Math.max(1, Math.ceil(labels.length / 10));
  labels.forEach((label, i) => {
    const last = labels.length - 1;
    if ((i % every === 0 && last - i >= every / 2) || i === last) {
      svg.append(h('text', {x: x(i), y: height - 6, class: 'tick', 'text-anchor': 'middle',
        text: label}));
    }
  });
  if (marker !== undefined && marker >= 0) {
    svg.append(h('line', {x1: x(marker), x2: x(marker), y1: top, y2: height - bottom,
      class: 'marker'}));
  }
  for (const {name, values, className} of series) {
    let d = '';
    values.forEach((v, i) => {
      if (v === null || v === undefined) return;
      const previous = i > 0 && values[i - 1] !== null && values[i - 1] !== undefined;
      d += `${previous ? 'L' : 'M'}${x(i).toFixed(1)},${y(v).toFixed(1)}`;
    });
    svg.append(h('path', {d, class: `series ${className}`}));
    values.forEach((v, i) => {
      if (v === null || v === undefined) return;
      svg.append(h('circle', {cx: x(i), cy: y(v), r: 3, class: `series ${className}`,
        onclick: onPick ? () => onPick(i) : null},
        h('title', {text: `${name} at step ${labels[i]}: ${v.toFixed(3)}`})));
    });
  }
  return svg;
}

// A probe image with an attribution's heat map over it (red raises the unit or concept, blue
// lowers it); the heat map stays hidden until it is there, or while the overlay is off.
export class OverlaidImage {
  constructor(src, box, className = 'example-image', alt = '') {
    this.overlay = h('img', {class: 'attribution', alt: '', hidden: true});
    this.state = h('span', {class: 'attribution-state'});
    this.el = h('div', {class: className}, h('img', {src, alt}), this.overlay, box, this.state);
  }

  // {status: 'queued' | 'running'} while it is computed, then the result, or {error}.
  show(result) {
    this.el.dataset.attribution = result.overlay ? 'done' : result.error ? 'failed' : 'waiting';
    this.el.title = result.error || (result.overlay ? `${result.method.replace('_', ' ')}: `
      + `from ${result.min.toPrecision(3)} to ${result.max.toPrecision(3)}, `
      + `sum ${result.sum.toPrecision(3)}` : '');
    this.state.textContent = result.overlay ? '' : result.error ? 'failed'
      : result.status === 'running' ? 'computing…' : 'queued…';
    if (result.overlay && this.overlay.getAttribute('src') !== result.overlay) {
      this.overlay.src = result.overlay;
    }
    this.overlay.hidden = !result.overlay;
  }

  hide() {
    this.overlay.hidden = true;
    this.state.textContent = '';
    delete this.el.dataset.attribution;
    this.el.title = '';
  }
}

// The attribution controls over dataset examples: an "attribution" checkbox, its method (one of
// `methods`) and the heat map's key, for `what` ('the unit', 'the concept'). `options` holds the
// overlay (on or off) and the method, kept by the page so that scrubbing the steps keeps them;
// onChange() follows a change of either.
export class AttributionControls {
  constructor(methods, options, what, onChange) {
    this.options = options;
    this.toggle = h('input', {type: 'checkbox', id: 'attribution-overlay', checked: options.overlay,
      onchange: () => {
        options.overlay = this.toggle.checked;
        onChange();
      }});
    this.methodSelect = select(methods.map((m) => [m, m.replace('_', ' ')]), options.method,
      (method) => {
        options.method = method;
        onChange();
      }, {id: 'attribution-method', 'aria-label': 'attribution method'});
    this.legend = h('span', {class: 'heat-legend muted'}, h('span', {class: 'key raises'}),
      `raises ${what}`, h('span', {class: 'key lowers'}), 'lowers it');
    this.els = [h('label', {class: 'control'}, this.toggle, ' attribution'),
      h('label', {class: 'control'}, 'method ', this.methodSelect), this.legend];
    this.refresh();
  }

  // The method and the key dimmed while the overlay is off.
  refresh() {
    this.methodSelect.disabled = !this.options.overlay;
    this.legend.classList.toggle('off', !this.options.overlay);
  }
}

// The attributions a page of dataset examples shows: each asked of `fetch(step, index, method,
// signal, onWait)` (a promise of the route's result) once, and kept in `results` (without its
// values: the heat map says enough here) for the page's life; the notes they come with (a
// method's caveat), in `this.notes`.
export class Attributions {
  constructor(fetch, results = new Map()) {
    Object.assign(this, {fetch, results});
    this.notes = h('p', {class: 'muted notes', hidden: true});
    this.restart();
  }

  // Drops the requests in flight (the step, the method or the overlay changed).
  restart() {
    this.controller?.abort();
    this.controller = new AbortController();
  }

  // The attribution of probe image `index` at `step` by `method`, to onResult as it comes (its
  // waiting states first).
  get(step, index, method, onResult) {
    const key = `${step}|${index}|${method}`;
    if (this.results.has(key)) {
      this.note(this.results.get(key).notes);
      onResult(this.results.get(key));
      return;
    }
    onResult({status: 'queued'});
    const signal = this.controller.signal;
    this.fetch(step, index, method, signal, onResult).then((result) => {
      const {values, ...shown} = result;
      this.results.set(key, shown);
      this.note(shown.notes);
      if (!signal.aborted) onResult(shown);
    }).catch((error) => {
      if (!signal.aborted) onResult({error: error.message});
    });
  }

  note(notes = []) {
    const known = new Set(this.notes.textContent ? this.notes.textContent.split('\n') : []);
    notes.forEach((note) => known.add(note));
    this.notes.textContent = [...known].join('\n');
    this.notes.hidden = !known.size;
  }

  destroy() {
    this.controller?.abort();
  }
}
