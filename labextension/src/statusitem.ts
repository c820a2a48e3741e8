/** The status bar item: the active notebook kernel's slice, its idle countdown ticking locally. */
import { Widget } from '@lumino/widgets';

import { ActiveKernelLease } from './kernel';
import { statusText } from './format';

const TICK_MS = 1000;

export class SliceStatusItem extends Widget {
  constructor(private readonly _model: ActiveKernelLease) {
    super();
    this.addClass('jp-mig-StatusItem');
    this.node.dataset.migKernel = 'status';
    _model.changed.connect(this._render, this);
    this._render();
  }

  dispose(): void {
    clearInterval(this._ticker);
    super.dispose();
  }

  private _render(): void {
    const { lease, error } = this._model;
    let text: string;
    let title: string;
    if (lease !== null) {
      text = statusText(lease, Date.now() - this._model.receivedAt, this._model.running);
      const slice = lease.slice;
      title = slice
        ? `Slice ${slice.id} (${slice.uuid}), lease ${slice.lease?.id ?? '?'}; ` +
          'idle: time left before the slice goes back to the pool (your data is kept)'
        : lease.state === 'queued'
          ? 'Waiting in the queue for a GPU slice; the GPU slices panel shows why'
          : 'This kernel holds no GPU slice; its next GPU cell asks for one';
    } else if (error !== null) {
      text = 'GPU slice: ?';
      title = `mig-kernel: ${error.message}`;
    } else {
      text = 'GPU slice: none';
      title = 'This kernel holds no GPU slice';
    }
    this.node.textContent = text;
    this.node.title = title;
    this.node.dataset.migRunning = String(lease?.state === 'leased' && text.includes('running'));
    this._tick(lease?.slice?.lease?.expires_in != null);
  }

  /** Re-render every second while a countdown is shown, and only then. */
  private _tick(on: boolean): void {
    if (on && !this._ticker) {
      this._ticker = window.setInterval(() => this._render(), TICK_MS);
    } else if (!on && this._ticker) {
      clearInterval(this._ticker);
      this._ticker = 0;
    }
  }

  private _ticker = 0;
}
