// The Microscope tab (a first version): runs, nodes, and a grid of a node's units at a step.
// Loaded by TensorBoard as an ES module in the plugin's iframe; talks only to this plugin's routes.

const route = (path) => new URL(path, import.meta.url).toString();

async function getJson(path) {
  const response = await fetch(route(path));
  if (!response.ok) throw new Error(await response.text());
  return response.json();
}

function element(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  Object.assign(el, attrs);
  el.append(...children);
  return el;
}

async function showUnit(cell, params) {
  const url = route(`image?${params}`);
  for (;;) {
    const response = await fetch(url);
    if (response.status === 200) {
      const img = element('img', {src: URL.createObjectURL(await response.blob())});
      cell.replaceChildren(img, cell.lastChild);
      return;
    }
    if (response.status !== 202) {
      cell.firstChild.textContent = `failed: ${await response.text()}`;
      return;
    }
    const status = await response.json();
    cell.firstChild.textContent = `${status.status}${status.status === 'queued' ? ` #${status.position}` : ''}`;
    await new Promise((resolve) => setTimeout(resolve, 500));
  }
}

async function showNode(grid, run, step, node) {
  grid.replaceChildren();
  for (let unit = 0; unit < node.units; unit++) {
    const cell = element('figure', {className: 'unit'}, element('div', {textContent: 'queued'}),
                         element('figcaption', {textContent: `${node.name}:${unit}`}));
    grid.append(cell);
    const params = new URLSearchParams({run, step, node: node.name, unit});
    showUnit(cell, params);
  }
}

export async function render() {
  document.body.append(element('style', {textContent: `
    body { font-family: Roboto, sans-serif; margin: 16px; }
    .grid { display: grid; grid-template-columns: repeat(auto-fill, 136px); gap: 8px; }
    .unit { margin: 0; } .unit img, .unit div { width: 128px; height: 128px; }
    .unit div { display: flex; align-items: center; justify-content: center; background: #eee; }
  `}));
  const runs = await getJson('runs');
  if (!runs.length) {
    document.body.append(element('p', {textContent: 'No run holds tb_microscope data.'}));
    return;
  }
  const runSelect = element('select', {id: 'run'});
  const stepSelect = element('select', {id: 'step'});
  const nodeSelect = element('select', {id: 'node'});
  const grid = element('div', {className: 'grid', id: 'grid'});
  document.body.append(element('div', {}, 'Run ', runSelect, ' Step ', stepSelect, ' Node ',
                                nodeSelect), grid);
  runs.forEach((r) => runSelect.append(element('option', {value: r.run, textContent: r.run})));
  let nodes = [];
  const refresh = () => {
    const node = nodes.find((n) => n.name === nodeSelect.value);
    if (node) showNode(grid, runSelect.value, stepSelect.value, node);
  };
  const loadRun = async () => {
    const run = runs.find((r) => r.run === runSelect.value);
    stepSelect.replaceChildren(...run.steps.map((s) => element('option', {value: s, textContent: s})));
    stepSelect.value = run.steps[run.steps.length - 1];
    nodes = (await getJson(`nodes?run=${encodeURIComponent(run.run)}`)).nodes;
    nodeSelect.replaceChildren(...nodes.map((n) => element('option', {value: n.name,
                                                                       textContent: `${n.name} (${n.units})`})));
    refresh();
  };
  runSelect.onchange = loadRun;
  stepSelect.onchange = refresh;
  nodeSelect.onchange = refresh;
  await loadRun();
}
