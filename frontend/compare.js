// Compare: the same node (its grid) or unit (its image) side by side, at two steps of one run or
// in two runs. The left pane follows the header's run and step; the right pane has its own.
// "Align units" pairs a node's units across the panes: across two runs, each unit on the left
// with its one-to-one match on the right (units are only defined up to permutation), best
// matched first; at two steps of one run, each unit with itself, most changed first.

import {getResult} from './api.js';
import {errorBox, h, select, StepSlider} from './dom.js';
import {NodeGrid} from './node.js';
import {UnitImage} from './unit.js';

class Pane {
  constructor(app, side, state) {
    Object.assign(this, {app, side, node: state.node, unit: state.unit,
      technique: state.technique});
    this.title = h('h3', {class: 'address'});
    this.body = h('div', {class: 'pane-body'});
    this.head = h('div', {class: 'pane-head'}, this.title);
    if (side === 'right') {
      this.runSelect = select(app.runs.map((r) => [r.run, r.run]), '',
        (run2) => app.navigate({run2, step2: null}), {'aria-label': 'run to compare with'});
      this.slider = new StepSlider((step2) => app.navigate({step2}, true),
        (step2) => app.navigate({step2}), 'step2');
      this.head.append(this.runSelect, this.slider.el);
    }
    this.el = h('section', {class: `pane ${side}`, dataset: {side}}, this.head, this.body);
  }

  // The units shown, in order, and their captions (null: all, by number).
  arrange(order, caption) {
    Object.assign(this, {order, caption});
    this.run = null;  // the next show() builds the grid again
  }

  async show(run, step) {
    this.title.textContent = `${run}@${step}/${this.node}${this.unit === undefined ? ''
      : `:${this.unit}`}`;
    if (this.slider) {
      this.runSelect.value = run;
      this.slider.set(this.app.runInfo(run).steps, step);
    }
    if (run === this.run) return this.content?.show(step);
    this.run = run;
    this.content?.destroy();
    this.content = null;
    this.body.replaceChildren(h('p', {class: 'muted', text: 'loading…'}));  // not the old run's
    let nodes;
    try {
      nodes = (await this.app.nodesOf(run)).nodes;
    } catch (error) {
      return this.body.replaceChildren(errorBox(error.message));
    }
    if (this.run !== run) return undefined;  // another run was picked meanwhile
    const node = nodes.find((n) => n.name === this.node);
    const message = this.app.checkUnit(run, nodes, this.node, this.unit);
    if (message) return this.body.replaceChildren(errorBox(message));
    this.content = this.unit === undefined
      ? new NodeGrid(this.app, run, node, this.technique, step,
        {order: this.order ?? undefined, caption: this.caption ?? undefined})
      : new UnitImage(this.app, run, this.node, this.unit, this.technique, step);
    this.body.replaceChildren(this.content.el);
    return undefined;
  }

  destroy() {
    this.content?.destroy();
  }
}

const fmt = (value) => (value === null || value === undefined ? 'n/a' : value.toFixed(2));

export class CompareView {
  constructor(app, state) {
    this.app = app;
    this.left = new Pane(app, 'left', state);
    this.right = new Pane(app, 'right', state);
    this.alignButton = h('button', {id: 'align', text: 'align units',
      title: 'pair each unit with its match in the other pane (one to one, by the correlation '
        + 'of their activations on the probe images)',
      onclick: () => app.navigate({align: !this.state.align})});
    this.alignInfo = h('div', {class: 'align-info muted'});
    this.el = h('section', {class: 'compare-view'},
      h('div', {class: 'view-head'}, h('h2', {text: 'Compare'}),
        h('span', {class: 'muted', text: 'the same node or unit at two steps, or in two runs'}),
        this.alignButton,
        h('button', {text: 'close', onclick: () => app.navigate({compare: false})})),
      this.alignInfo,
      h('div', {class: 'panes'}, this.left.el, this.right.el));
    this.update(state);
  }

  update(state) {
    this.state = state;
    const aligned = Boolean(state.align) && state.unit === undefined;
    this.alignButton.hidden = state.unit !== undefined || !this.app.run.probe;
    this.alignButton.setAttribute('aria-pressed', String(aligned));
    const pairing = aligned ? `${state.run}@${state.step}|${state.run2}@${state.step2}` : '';
    if (pairing !== this.pairing) {
      this.pairing = pairing;
      this.controller?.abort();
      if (!aligned) {
        this.alignInfo.replaceChildren();
        this.left.arrange(null, null);
        this.right.arrange(null, null);
      } else {
        this.align(state);
        return true;
      }
    }
    this.left.show(state.run, state.step);
    this.right.show(state.run2, state.step2);
    return true;
  }

  async align(state) {
    this.controller = new AbortController();
    const signal = this.controller.signal;
    this.alignInfo.textContent = 'matching units…';
    let found;
    try {
      found = await getResult('align', {run: state.run, step: state.step, node: state.node,
        run2: state.run2, step2: state.step2}, signal, (wait) => {
        this.alignInfo.textContent = wait.status === 'running' ? 'matching units…'
          : `matching units: queued #${(wait.position ?? 0) + 1}`;
      });
    } catch (error) {
      if (!signal.aborted) this.alignInfo.replaceChildren(errorBox(error.message));
      return;
    }
    if (signal.aborted) return;
    const sameRun = state.run === state.run2;
    const units = found.unit_b.map((_, unit) => unit);
    if (sameRun) {  // most changed first; units that do not vary last
      const score = found.same_unit;
      units.sort((a, b) => (score[a] ?? 2) - (score[b] ?? 2) || a - b);
      this.left.arrange(units, (u) => `${u} · r ${fmt(score[u])}`);
      this.right.arrange(units, (u) => String(u));
      this.alignInfo.textContent = `Units ordered by how much they changed from step `
        + `${state.step} to ${state.step2}: r is each unit's correlation with itself on the `
        + 'probe images, lowest first.';
    } else {  // best matched first
      const score = found.correlation;
      units.sort((a, b) => (score[b] ?? -2) - (score[a] ?? -2) || a - b);
      const matched = units.filter((u) => found.unit_b[u] >= 0);
      this.left.arrange(matched, (u) => `${u} → ${found.unit_b[u]}`);
      this.right.arrange(matched.map((u) => found.unit_b[u]),
        (b) => `${b} · r ${fmt(score[found.unit_b.indexOf(b)])}`);
      const values = score.filter((v) => v !== null);
      const mean = values.reduce((sum, v) => sum + v, 0) / (values.length || 1);
      this.alignInfo.textContent = `Each unit of ${state.run}@${state.step} beside its match in `
        + `${state.run2}@${state.step2} (one to one), best matched first: mean correlation `
        + `${fmt(mean)}, ${values.filter((v) => v >= 0.9).length} of ${units.length} pairs at `
        + '0.9 or more.';
    }
    this.alignInfo.dataset.ready = 'true';
    this.left.show(state.run, state.step);
    this.right.show(state.run2, state.step2);
  }

  destroy() {
    this.controller?.abort();
    this.left.destroy();
    this.right.destroy();
  }
}
