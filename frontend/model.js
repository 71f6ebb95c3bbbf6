// The model view: what the run is, and its nodes in forward order with the graph's edges drawn
// beside them (a skip connection is an arc), as Microscope draws a model. A node opens its grid.

import {h} from './dom.js';

const ROW = 44;  // px per node row

const SKIP = 9;  // px further out per node an arc skips, up to MAX_SKIP nodes
const MAX_SKIP = 6;

function edgePath(from, to, gutter) {
  const y1 = from * ROW + ROW / 2, y2 = to * ROW + ROW / 2;
  if (to === from + 1) return `M${gutter},${y1 + 8}L${gutter},${y2 - 8}`;
  const bend = gutter - 14 - SKIP * Math.min(to - from - 1, MAX_SKIP);
  return `M${gutter - 4},${y1 + 6}C${bend},${y1 + 6} ${bend},${y2 - 6} ${gutter - 4},${y2 - 6}`;
}

export function modelView(app, state) {
  const info = app.run;
  const rows = [{name: 'input', module: 'input', shape: info.input.shape, units: null}, ...app.nodes];
  const index = new Map(rows.map((row, i) => [row.name, i]));
  const spans = app.edges.map(([a, b]) => [index.get(a), index.get(b)].sort((x, y) => x - y))
    .filter(([from, to]) => from !== undefined && to !== undefined);
  const widest = Math.max(0, ...spans.map(([from, to]) => Math.min(to - from - 1, MAX_SKIP)));
  const gutter = widest ? 20 + SKIP * widest : 8;
  const edges = h('svg', {class: 'edges', width: gutter + 4, height: rows.length * ROW,
    'aria-hidden': 'true'});
  for (const [from, to] of spans) {
    edges.append(h('path', {d: edgePath(from, to, gutter), class: 'edge'}));
  }
  const names = rows.map((row) => row.name);
  const list = h('ol', {class: 'nodes'}, rows.map((row) => {
    // Nested modules are indented under the module that holds them, as in the model's code.
    const depth = row.name.split('.').length - 1;
    const holds = names.some((name) => name.startsWith(`${row.name}.`));
    const body = [
      h('span', {class: `address${holds ? ' holder' : ''}`, style: `padding-left:${14 * depth}px`,
        text: row.name}),
      h('span', {class: 'muted', text: row.module}),
      h('span', {class: 'units', text: row.units === null ? '' : `${row.units} units`}),
      h('span', {class: 'muted', text: row.shape.join('×')}),
    ];
    if (row.units === null) return h('li', {class: 'node input'}, ...body);
    return h('li', {class: 'node'}, h('a', {href: app.link({node: row.name}),
      dataset: {node: row.name}, onclick: (event) => {
        event.preventDefault();
        app.navigate({node: row.name});
      }}, ...body));
  }));
  const model = info.model;
  const probe = info.probe ? `${info.probe.count} probe images` : 'no probe images';
  return {
    el: h('section', {class: 'model-view'},
      h('div', {class: 'view-head'}, h('h2', {text: state.run}),
        h('span', {class: 'muted', text: `${model.class} · ${model.parameters.toLocaleString()} `
          + `parameters · ${info.steps.length} logged steps (${info.steps[0]} to `
          + `${info.steps[info.steps.length - 1]}) · ${probe}`})),
      h('p', {class: 'muted', text: 'Pick a node to see its units. Edges come from the '
        + 'exported graph; an arc is a connection that skips nodes.'}),
      h('div', {class: 'graph'}, edges, list)),
    update: () => true,
    destroy: () => {},
  };
}
