// The plugin's routes. URLs are relative to the plugin's base (plugin_entry.html sets <base> to
// .../data/plugin/tb_microscope/), so the tab works under TensorBoard's --path_prefix.

// Polling: every POLL_MS for BRISK_MS after the answer last changed (a preview comes within
// seconds), then backing off to MAX_POLL_MS while nothing changes (the server drops work nobody
// asked about for 5 s, so never slower). It stops, saying why, when the server shows no
// progress for STALL_MS (a full-quality render on a CPU can take 20 minutes and more, and work
// waits behind other work), or says something is done but cannot serve it UNSERVED times in a
// row (its log says why).
const POLL_MS = 500;
const BRISK_MS = 5000;
const MAX_POLL_MS = 2000;
const STALL_MS = 60 * 60 * 1000;
const UNSERVED = 5;

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

// How long to wait before the next poll, given what the last one said (`seen`: anything that
// compares with ===, a string say); throws a RequestError once nothing changed for STALL_MS.
export class Backoff {
  constructor(now = Date.now()) {
    this.delay = POLL_MS;
    this.seen = undefined;
    this.changed = now;
  }

  next(seen, now = Date.now()) {
    if (seen !== this.seen) {
      this.seen = seen;
      this.changed = now;
      this.delay = POLL_MS;
    } else if (now - this.changed >= BRISK_MS) {
      this.delay = Math.min(MAX_POLL_MS, this.delay * 1.5);
    }
    if (now - this.changed >= STALL_MS) {
      throw new RequestError(0, `the server has shown no progress on this for ${STALL_MS / 60000} ` +
        'minutes; see the server\'s log, and reload to ask again');
    }
    return this.delay;
  }
}

// What a waiting status says that matters: not the seconds it has run, which always change.
function progressOf(status) {
  const {elapsed_s: _, ...rest} = status;
  return JSON.stringify(rest);
}

const UNSERVED_MESSAGE = 'the server says this is ready but cannot serve it; see the server\'s log';

// A computed result (examples, weights, history): the server answers 202 with its place in the
// queue until a worker has computed it; `onWait(status)` hears each of those.
export async function getResult(path, params, signal, onWait = () => {}) {
  const backoff = new Backoff();
  let unserved = 0;  // "done" answers in a row that came without the result
  for (;;) {
    const response = await check(await fetch(route(path, params), {signal}));
    if (response.status !== 202) return response.json();
    const status = await response.json();
    unserved = status.status === 'done' ? unserved + 1 : 0;
    if (unserved >= UNSERVED) throw new RequestError(202, UNSERVED_MESSAGE);
    onWait(status);
    await sleep(backoff.next(progressOf(status)), signal);
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
// A unit the server calls done whose image it then does not give (it found its cached file
// unreadable and renders it again) stays pending; UNSERVED times in a row, it has failed.
export async function watchUnits(group, units, count, onUpdate, signal) {
  const previews = new Map();  // unit -> its preview's image URLs, once shown
  const unserved = new Map();  // unit -> "done" answers in a row that came without its image
  const backoff = new Backoff();
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
        unserved.delete(unit);
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
        if (signal.aborted) return;
        const times = (unserved.get(unit) || 0) + 1;
        if (error.status === 202 && times < UNSERVED) {  // asked for again: it comes
          unserved.set(unit, times);
          onUpdate(unit, {status: 'queued', position: null});
          next.push(unit);
        } else {
          onUpdate(unit, {status: 'failed',
            error: error.status === 202 ? UNSERVED_MESSAGE : error.message});
        }
      }
    }));
    pending = next;
    if (!pending.length) return;
    const seen = JSON.stringify(pending.map((unit) => [unit, progressOf(statuses[unit])]));
    try {
      await sleep(backoff.next(seen), signal);
    } catch (error) {
      pending.forEach((unit) => onUpdate(unit, {status: 'failed', error: error.message}));
      return;
    }
  }
}
