// Compare: the same node (its grid) or unit (its image) side by side, at two steps of one run or
// in two runs. The left pane follows the header's run and step; the right pane has its own.

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
      ? new NodeGrid(this.app, run, node, this.technique, step)
      : new UnitImage(this.app, run, this.node, this.unit, this.technique, step);
    this.body.replaceChildren(this.content.el);
    return undefined;
  }

  destroy() {
    this.content?.destroy();
  }
}

export class CompareView {
  constructor(app, state) {
    this.app = app;
    this.left = new Pane(app, 'left', state);
    this.right = new Pane(app, 'right', state);
    this.el = h('section', {class: 'compare-view'},
      h('div', {class: 'view-head'}, h('h2', {text: 'Compare'}),
        h('span', {class: 'muted', text: 'the same node or unit at two steps, or in two runs'}),
        h('button', {text: 'close', onclick: () => app.navigate({compare: false})})),
      h('div', {class: 'panes'}, this.left.el, this.right.el));
    this.update(state);
  }

  update(state) {
    this.left.show(state.run, state.step);
    this.right.show(state.run2, state.step2);
    return true;
  }

  destroy() {
    this.left.destroy();
    this.right.destroy();
  }
}
