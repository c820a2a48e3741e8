/**
 * The right side panel "GPU slices": the partition map of the node, drawn again on each answer
 * of the shared poller, with a Release button on the user's own slices held by a kernel here.
 */
import { Session } from '@jupyterlab/services';
import { SidePanel } from '@jupyterlab/ui-components';
import { Panel, Widget } from '@lumino/widgets';

import { MigApi } from './api';
import { el } from './dom';
import { idleText, renderNode, waitingText } from './partition';
import { SlicePoller } from './poller';
import { gpuIcon } from './icon';

export const PANEL_ID = 'mig-kernel-panel';
const TICK_MS = 1000;

export class PartitionView extends Widget {
  constructor(
    private readonly _api: MigApi,
    private readonly _poller: SlicePoller,
    private readonly _sessions: Session.IManager
  ) {
    super();
    this.addClass('jp-mig-PartitionView');
    _poller.changed.connect(this._render, this);
    _sessions.runningChanged.connect(this._render, this);
    this._render();
  }

  dispose(): void {
    clearInterval(this._ticker);
    super.dispose();
  }

  /** Shown: draw and tick; hidden: nothing to do until the next answer. */
  protected onAfterShow(): void {
    this._render();
  }

  protected onBeforeHide(): void {
    clearInterval(this._ticker);
    this._ticker = 0;
  }

  private _render(): void {
    const { state, error } = this._poller;
    const body: Node[] = [];
    if (this._message) {
      body.push(el('div', 'jp-mig-Message', this._message));
    }
    if (state === null) {
      body.push(
        el(
          'div',
          'jp-mig-Message',
          error ? `No answer from the mig-kernel server API: ${error.message}` : 'Loading…'
        )
      );
    } else {
      if (error) {
        body.push(el('div', 'jp-mig-Message', `Not up to date: ${error.message}`));
      }
      body.push(
        renderNode(state, {
          elapsedMs: Date.now() - this._poller.receivedAt,
          kernelLabel: id => this._notebookOf(id),
          onRelease: (id, button) => void this._release(id, button)
        })
      );
    }
    this.node.replaceChildren(...body);
    const clocks = this.node.querySelector('[data-mig-expires], [data-mig-waiting]');
    const ticking = this.isVisible && clocks !== null;
    if (ticking && !this._ticker) {
      this._ticker = window.setInterval(() => this._tick(), TICK_MS);
    } else if (!ticking && this._ticker) {
      clearInterval(this._ticker);
      this._ticker = 0;
    }
  }

  /** Only the clocks change between answers: no redraw, so a hovered button stays put. */
  private _tick(): void {
    const elapsed = Date.now() - this._poller.receivedAt;
    this.node.querySelectorAll<HTMLElement>('[data-mig-expires]').forEach(clock => {
      clock.textContent = idleText(Number(clock.dataset.migExpires), elapsed);
    });
    this.node.querySelectorAll<HTMLElement>('[data-mig-waiting]').forEach(clock => {
      clock.textContent = waitingText(Number(clock.dataset.migWaiting), elapsed);
    });
  }

  private _notebookOf(kernelId: string): string | null {
    for (const session of this._sessions.running()) {
      if (session.kernel?.id === kernelId) {
        return session.path;
      }
    }
    return null;
  }

  private async _release(kernelId: string, button: HTMLButtonElement): Promise<void> {
    button.disabled = true;
    button.textContent = 'Releasing…';
    try {
      const reply = await this._api.release(kernelId);
      this._message =
        `Released lease ${reply.released}: the kernel's device data is kept ` +
        'and comes back with its next GPU cell.';
    } catch (error) {
      this._message = `Release failed: ${(error as Error).message}`;
    }
    this._poller.refresh();
    this._render();
  }

  private _message = '';
  private _ticker = 0;
}

/** The panel itself: a title, then the view. */
export function createPanel(view: PartitionView): SidePanel {
  const panel = new SidePanel({ content: new Panel() });
  panel.id = PANEL_ID;
  panel.addClass('jp-mig-Panel');
  panel.title.icon = gpuIcon;
  panel.title.caption = 'GPU slices';
  const title = new Widget({ node: el('h2', 'jp-mig-PanelTitle', 'GPU slices') });
  panel.header.addWidget(title);
  panel.addWidget(view);
  return panel;
}
