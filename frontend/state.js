// The current view lives in TensorBoard's own URL hash, in its plugin convention
// (#tb_microscope&p.tb_microscope.node=conv2&p.tb_microscope.unit=3), so that a link reopens the
// view and the browser's Back button walks back through it. The tab runs in a same-origin iframe;
// opened on its own, it uses its own URL.

const PREFIX = 'p.tb_microscope.';
const KEYS = ['run', 'step', 'node', 'unit', 'technique', 'compare', 'run2', 'step2', 'bands', 'sort',
  'align', 'atlas', 'grid', 'concepts', 'method', 'count', 'concept', 'reference'];
const NUMBERS = new Set(['step', 'unit', 'step2', 'grid', 'count', 'concept', 'reference']);
const FLAGS = ['compare', 'align', 'atlas', 'concepts'];  // true as '1' in the URL, else left out

function hostWindow() {
  try {
    void window.top.location.hash;  // throws where the host is another origin
    return window.top;
  } catch {
    return window;
  }
}

export const host = hostWindow();

function parts() {
  return host.location.hash.slice(1).split('&').filter(Boolean);
}

// Whether the URL is about this tab: TensorBoard names the active tab by a part without '='.
export function isOurTab() {
  const tab = parts().find((part) => !part.includes('='));
  return tab === undefined || tab === 'tb_microscope';
}

// The state in the URL: strings, but numbers for the NUMBERS, and booleans for the FLAGS.
export function readState() {
  const state = {};
  for (const part of parts()) {
    const [key, value] = part.split('=');
    if (value === undefined || !key.startsWith(PREFIX)) continue;
    const name = decodeURIComponent(key.slice(PREFIX.length));
    if (!KEYS.includes(name)) continue;
    const text = decodeURIComponent(value);
    state[name] = NUMBERS.has(name) ? (/^\d+$/.test(text) ? Number(text) : text) : text;
  }
  for (const flag of FLAGS) state[flag] = state[flag] === '1';
  return state;
}

export function stateHash(state) {
  const kept = parts().filter((part) => !part.startsWith(PREFIX));
  if (!kept.length) kept.push('tb_microscope');
  for (const key of KEYS) {
    let value = state[key];
    if (FLAGS.includes(key)) value = value ? '1' : null;
    if (value === undefined || value === null || value === '') continue;
    kept.push(`${PREFIX}${key}=${encodeURIComponent(value)}`);
  }
  return `#${kept.join('&')}`;
}

// A new history entry, or (`replace`) the current one changed in place, as while dragging a slider.
export function writeState(state, replace = false) {
  const hash = stateHash(state);
  if (hash === host.location.hash) return;
  if (replace) host.history.replaceState(host.history.state, '', hash);
  else host.location.hash = hash;
}
