// The plugin's routes. URLs are relative to the plugin's base (plugin_entry.html sets <base> to
// .../data/plugin/tb_microscope/), so the tab works under TensorBoard's --path_prefix.

const POLL_MS = 500;

export class RequestError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export function route(path, params = {}) {
  const url = new URL(path, document.baseURI);
  for (const [key, value] of Object.entries(params)) {
    if (value !== undefined && value !== null) url.searchParams.set(key, value);
  }
  return url.toString();
}

async function check(response) {
  if (response.ok) return response;
  // TensorBoard answers our errors as text: "Not found: node 'x' is not in run ...".
  throw new RequestError(response.status, (await response.text()).trim() || response.statusText);
}

export async function getJson(path, params, signal) {
  return (await check(await fetch(route(path, params), {signal}))).json();
}

export async function postJson(path, body, signal) {
  const response = await fetch(route(path), {
    method: 'POST',
    headers: {'Content-Type': 'application/json'},
    body: JSON.stringify(body),
    signal,
  });
  return (await check(response)).json();
}

export function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener('abort', () => {
      clearTimeout(timer);
      resolve();
    }, {once: true});
  });
}

// Rendered images by their image-route URL, as object URLs: a step scrubbed back to shows at once.
const images = new Map();

async function loadImage(params, signal) {
  const url = route('image', params);
  if (!images.has(url)) {
    const response = await check(await fetch(url, {signal}));
    if (response.status !== 200) throw new RequestError(response.status, 'the image is not ready');
    images.set(url, URL.createObjectURL(await response.blob()));
  }
  return images.get(url);
}

function known(group, unit, count) {
  const urls = [];
  for (let image = 0; image < count; image++) {
    const url = images.get(route('image', {...group, unit, image}));
    if (!url) return null;
    urls.push(url);
  }
  return urls;
}

// Asks the render service for `units` of one group (run, step, node, technique) and reports each
// unit's state to onUpdate(unit, state) until it is rendered or failed: {status: 'queued',
// position}, {status: 'running', progress}, {status: 'done', urls}, {status: 'failed', error}.
// One POST per poll covers all the pending units; the service renders them in one optimization.
export async function watchUnits(group, units, count, onUpdate, signal) {
  let pending = [];
  for (const unit of units) {
    const urls = known(group, unit, count);
    if (urls) onUpdate(unit, {status: 'done', urls});
    else pending.push(unit);
  }
  while (pending.length && !signal.aborted) {
    let statuses;
    try {
      statuses = (await postJson('render', {...group, units: pending}, signal)).units;
    } catch (error) {
      if (signal.aborted) return;
      if (error.status === 503) {  // the queue is full: wait and ask again
        pending.forEach((unit) => onUpdate(unit, {status: 'queued', position: null}));
        await sleep(4 * POLL_MS, signal);
        continue;
      }
      pending.forEach((unit) => onUpdate(unit, {status: 'failed', error: error.message}));
      return;
    }
    const next = [];
    await Promise.all(pending.map(async (unit) => {
      const state = statuses[unit];
      if (state.status !== 'done') {
        onUpdate(unit, state);
        if (state.status !== 'failed') next.push(unit);
        return;
      }
      try {
        const urls = [];
        for (let image = 0; image < count; image++) {
          urls.push(await loadImage({...group, unit, image}, signal));
        }
        if (!signal.aborted) onUpdate(unit, {status: 'done', urls});
      } catch (error) {
        if (!signal.aborted) onUpdate(unit, {status: 'failed', error: error.message});
      }
    }));
    pending = next;
    if (pending.length) await sleep(POLL_MS, signal);
  }
}
