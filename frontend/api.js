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

// TensorBoard answers errors as text with the kind of error first ("Not found: node 'x' is not
// in run ..."); the tab says the message alone.
const ERROR_KIND = /^(Invalid argument|Not found|Permission denied|Unavailable|Unsupported media type): /;

async function check(response) {
  if (response.ok) return response;
  const text = (await response.text()).trim().replace(ERROR_KIND, '');
  throw new RequestError(response.status, text || response.statusText);
}

export async function getJson(path, params, signal) {
  return (await check(await fetch(route(path, params), {signal}))).json();
}

// A computed result (examples, weights, history): the server answers 202 with its place in the
// queue until a worker has computed it; `onWait(status)` hears each of those.
export async function getResult(path, params, signal, onWait = () => {}) {
  for (;;) {
    const response = await check(await fetch(route(path, params), {signal}));
    if (response.status !== 202) return response.json();
    onWait(await response.json());
    await sleep(POLL_MS, signal);
    if (signal?.aborted) throw new DOMException('aborted', 'AbortError');
  }
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

// Rendered images by their image-route URL, as object URLs, so that a step scrubbed back to shows
// at once; the least recently used go (and their memory with them) beyond MAX_IMAGES.
const MAX_IMAGES = 2000;
const images = new Map();

function remember(url, objectUrl) {
  images.set(url, objectUrl);
  while (images.size > MAX_IMAGES) {
    const [oldest, oldestUrl] = images.entries().next().value;
    images.delete(oldest);
    URL.revokeObjectURL(oldestUrl);
  }
  return objectUrl;
}

function recall(url) {
  const objectUrl = images.get(url);
  if (objectUrl) {
    images.delete(url);  // most recently used goes last
    images.set(url, objectUrl);
  }
  return objectUrl;
}

async function loadImage(params, signal) {
  const url = route('image', params);
  const found = recall(url);
  if (found) return found;
  const response = await check(await fetch(url, {signal}));
  if (response.status !== 200) throw new RequestError(response.status, 'the image is not ready');
  return remember(url, URL.createObjectURL(await response.blob()));
}

// The image route's parameters for one picture of a unit; `image` only where a unit has several
// (for a caricature, whose units are probe images, the route reads `image` as the probe image).
function picture(group, unit, image, count) {
  return count > 1 ? {...group, unit, image} : {...group, unit};
}

function known(group, unit, count) {
  const urls = [];
  for (let image = 0; image < count; image++) {
    const url = recall(route('image', picture(group, unit, image, count)));
    if (!url) return null;
    urls.push(url);
  }
  return urls;
}

// Tells the server that nobody here waits for these units any more, so it stops their render.
function cancel(group, units) {
  fetch(route('cancel'), {
    method: 'POST',
    headers: {'Content-Type': 'application/json'},
    body: JSON.stringify({...group, units}),
    keepalive: true,
  }).catch(() => {});
}

// Asks the render service for `units` of one group (run, step, node, technique) and reports each
// unit's state to onUpdate(unit, state) until it is rendered or failed: {status: 'queued',
// position}, {status: 'running', progress}, {status: 'done', urls}, {status: 'failed', error}.
// While a unit waits for its full render, the server may have its preview (`preview: true`):
// the waiting states then carry `previewUrls`.
// One POST per poll covers all the pending units; the service renders them in one optimization.
export async function watchUnits(group, units, count, onUpdate, signal) {
  const previews = new Map();  // unit -> its preview's image URLs, once shown
  let pending = [];
  for (const unit of units) {
    const urls = known(group, unit, count);
    if (urls) onUpdate(unit, {status: 'done', urls});
    else pending.push(unit);
  }
  signal.addEventListener('abort', () => {
    if (pending.length) cancel(group, pending);
  }, {once: true});
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
        if (state.preview && !previews.has(unit)) {  // a first look while the full render runs
          try {
            const urls = [];
            for (let image = 0; image < count; image++) {
              urls.push(await loadImage({...picture(group, unit, image, count), quality: 'preview'},
                signal));
            }
            previews.set(unit, urls);
          } catch (error) {
            if (signal.aborted) return;  // else: the preview went (evicted); the full one comes
          }
        }
        onUpdate(unit, previews.has(unit) ? {...state, previewUrls: previews.get(unit)} : state);
        if (state.status !== 'failed') next.push(unit);
        return;
      }
      try {
        const urls = [];
        for (let image = 0; image < count; image++) {
          urls.push(await loadImage(picture(group, unit, image, count), signal));
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
