// The model view: what the run is, and its nodes in forward order, grouped by the module that
// holds them (collapsible, so that a model of hundreds of nodes stays readable), with a filter
// box, each row saying the node's layout and unit count. The graph's edges are drawn beside the
// rows shown (a skip connection is an arc; an edge into a collapsed group ends at the group).

import {h, layoutText} from './dom.js';
import {ModelDynamics} from './dynamics.js';

const ROW = 36;  // px per row
const SKIP = 9;  // px further out per row an arc skips, up to MAX_SKIP rows
const MAX_SKIP = 6;
const OPEN_ROWS = 60;  // groups open, level by level, while the rows shown stay within this

// Entries of the tree of node names: {name, node (or null for a group that is no node),
// children, order}. A dotted prefix that holds one entry only is skipped (path compression).
function buildTree(nodes) {
  const root = {children: new Map()};
  nodes.forEach((node, order) => {
    let at = root;
    const parts = node.name.split('.');
    parts.forEach((part, depth) => {
      if (!at.children.has(part)) {
        at.children.set(part, {name: parts.slice(0, depth + 1).join('.'), node: null,
          children: new Map(), order});
      }
      at = at.children.get(part);
    });
    at.node = node;
  });
  const entries = (trie) => [...trie.children.values()].flatMap((child) => {
    if (!child.node && child.children.size === 1) return entries(child);
    return [{name: child.name, node: child.node, order: child.order, children: entries(child)}];
  }).sort((a, b) => a.order - b.order);
  return entries(root);
}

function count(entry) {
  return (entry.node ? 1 : 0) + entry.children.reduce((sum, child) => sum + count(child), 0);
}

// The groups open at first: level by level, while the rows shown stay within OPEN_ROWS.
function firstOpen(tree) {
  const open = new Set();
  let level = tree;
  let shown = tree.length;
  while (level.length) {
    const groups = level.filter((entry) => entry.children.length);
    const more = groups.reduce((sum, entry) => sum + entry.children.length, 0);
    if (!groups.length || shown + more > OPEN_ROWS) break;
    groups.forEach((entry) => open.add(entry.name));
    shown += more;
    level = groups.flatMap((entry) => entry.children);
  }
  return open;
}

function edgePath(from, to, gutter) {
  const y1 = from * ROW + ROW / 2, y2 = to * ROW + ROW / 2;
  if (to === from + 1) return `M${gutter},${y1 + 6}L${gutter},${y2 - 6}`;
  const bend = gutter - 14 - SKIP * Math.min(to - from - 1, MAX_SKIP);
  return `M${gutter - 4},${y1 + 5}C${bend},${y1 + 5} ${bend},${y2 - 5} ${gutter - 4},${y2 - 5}`;
}

export function modelView(app, state) {
  const info = app.run;
  const tree = buildTree(app.nodes);
  const open = firstOpen(tree);
  const graph = h('div', {class: 'graph'});
  const filter = h('input', {type: 'search', id: 'node-filter', placeholder: 'filter nodes',
    'aria-label': 'filter nodes', oninput: () => draw()});
  const shownCount = h('span', {class: 'muted'});

  // The rows to show: every entry whose groups are open, or, with a filter, every entry that
  // matches it and the groups that hold one.
  function visible() {
    const query = filter.value.trim().toLowerCase();
    const rows = [];
    const walk = (entries, depth) => {
      for (const entry of entries) {
        const matches = (e) => e.name.toLowerCase().includes(query)
          || e.children.some(matches);
        if (query && !matches(entry)) continue;
        const expanded = query ? true : open.has(entry.name);
        rows.push({entry, depth, expanded});
        if (expanded) walk(entry.children, depth + 1);
      }
    };
    walk(tree, 0);
    return rows;
  }

  // A row: the name (with its group's toggle), then for a node its module, layout, unit count
  // and shape. The whole row of a node opens it.
  function row({entry, depth, expanded}) {
    const node = entry.node;
    const toggle = entry.children.length
      ? h('button', {class: 'toggle', 'aria-expanded': String(expanded),
        'aria-label': `${expanded ? 'collapse' : 'expand'} ${entry.name}`,
        text: expanded ? '▾' : '▸', onclick: () => {
          if (open.has(entry.name)) open.delete(entry.name);
          else open.add(entry.name);
          draw();
        }})
      : h('span', {class: 'toggle'});
    const label = node
      ? h('a', {class: 'address', href: app.link({node: node.name}), dataset: {node: node.name},
        text: entry.name, onclick: (event) => event.preventDefault()})
      : h('span', {class: 'address holder', text: entry.name});
    const name = h('span', {class: 'name', style: `padding-left:${14 * depth}px`}, toggle, label);
    if (!node) {
      return h('li', {class: 'node group', dataset: {group: entry.name}}, name,
        h('span', {class: 'muted', text: `${count(entry)} nodes`}));
    }
    const inside = entry.children.length && !expanded ? ` · ${count(entry) - 1} inside` : '';
    return h('li', {class: 'node', onclick: (event) => {
      if (event.target.closest('.toggle')) return;
      app.navigate({node: node.name});
    }}, name,
    h('span', {class: 'muted', text: node.module + inside}),
    h('span', {class: 'layout', text: layoutText(node)}),
    h('span', {class: 'units', text: `${node.units} units`}),
    h('span', {class: 'muted', text: node.shape.join('×')}));
  }

  function draw() {
    const rows = visible();
    // Each node's row, or the row of the shown group that holds it.
    const rowOf = new Map([['input', 0]]);
    rows.forEach(({entry}, i) => {
      const mark = (e) => {
        rowOf.set(e.name, i + 1);
        e.children.forEach(mark);
      };
      mark(entry);
    });
    const spans = [];
    const seen = new Set();
    for (const [a, b] of app.edges) {
      const [from, to] = [rowOf.get(a), rowOf.get(b)].sort((x, y) => x - y);
      if (from === undefined || to === undefined || from === to || seen.has(`${from},${to}`)) {
        continue;
      }
      seen.add(`${from},${to}`);
      spans.push([from, to]);
    }
    const widest = Math.max(0, ...spans.map(([from, to]) => Math.min(to - from - 1, MAX_SKIP)));
    const gutter = widest ? 20 + SKIP * widest : 8;
    const edges = h('svg', {class: 'edges', width: gutter + 4, height: (rows.length + 1) * ROW,
      'aria-hidden': 'true'});
    for (const [from, to] of spans) {
      edges.append(h('path', {d: edgePath(from, to, gutter), class: 'edge'}));
    }
    const input = h('li', {class: 'node input'},
      h('span', {class: 'name'}, h('span', {class: 'toggle'}), h('span', {text: 'input'})),
      h('span', {class: 'muted', text: 'input'}), h('span', {class: 'layout', text: ''}),
      h('span', {class: 'units', text: ''}),
      h('span', {class: 'muted', text: info.input.shape.join('×')}));
    graph.replaceChildren(edges, h('ol', {class: 'nodes'}, input, ...rows.map(row)));
    const query = filter.value.trim().toLowerCase();
    const matching = app.nodes.filter((n) => n.name.toLowerCase().includes(query)).length;
    shownCount.textContent = query
      ? `${matching} of ${app.nodes.length} nodes match` : `${app.nodes.length} nodes`;
  }

  draw();
  const dynamics = info.probe ? new ModelDynamics(app, state.run) : null;
  const model = info.model;
  const probe = info.probe ? `${info.probe.count} probe images` : 'no probe images';
  const channels = info.input.shape[0];
  return {
    el: h('section', {class: 'model-view'},
      h('div', {class: 'view-head'}, h('h2', {text: state.run}),
        h('span', {class: 'muted', text: `${model.class} · ${model.parameters.toLocaleString()} `
          + `parameters · ${info.steps.length} logged steps (${info.steps[0]} to `
          + `${info.steps[info.steps.length - 1]}) · ${probe} · ${channels} input channel`
          + `${channels === 1 ? '' : 's'}`})),
      h('p', {class: 'muted', text: 'Pick a node to see its units. Nodes are grouped by the '
        + 'module that holds them (▸ opens a group); edges come from the exported graph, and an '
        + 'arc is a connection that skips nodes.'}),
      model.note ? h('details', {class: 'capture-note muted'},
        h('summary', {text: 'Capture notes: what the program takes, which modules are left '
          + 'out and why'}),
        h('p', {text: model.note})) : null,
      dynamics?.el,
      h('div', {class: 'model-tools'}, filter, shownCount),
      graph),
    update: () => true,
    refresh: (run) => dynamics?.refresh(run.steps),
    destroy: () => dynamics?.destroy(),
  };
}
