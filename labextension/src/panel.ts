/**
 * The right side panel "GPU slices": the partition map of the node, drawn again on each answer
 * of the shared poller, with the active notebook's slice marked "this notebook" and a Release
 * button (after a confirmation that says the data is kept) on the user's own slices held by a
 * kernel here. A broker admin also gets a Release button on other users' slices (after a
 * confirmation that names the holder and says their device data is dropped).
 */
import { Dialog, ISessionContext, showDialog } from '@jupyterlab/apputils';
import { INotebookTracker } from '@jupyterlab/notebook';
import { Session } from '@jupyterlab/services';
import { SidePanel } from '@jupyterlab/ui-components';
import { Panel, Widget } from '@lumino/widgets';

import { ISlice, MigApi } from './api';
import { el } from './dom';
import { idleText, renderNode, waitingText } from './partition';
import { SlicePoller } from './poller';
import { gpuIcon } from './icon';

export const PANEL_ID = 'mig-kernel-panel';
const TICK_MS = 1000;
const MESSAGE_MS = 8000; // how long a note (released, failed) stays before it clears itself

export class PartitionView extends Widget {
  constructor(
    private readonly _api: MigApi,
    private readonly _poller: SlicePoller,
    private readonly _sessions: Session.IManager,
    private readonly _tracker: INotebookTracker
  ) {
    super();
    this.addClass('jp-mig-PartitionView');
    _poller.changed.connect(this._render, this);
    _sessions.runningChanged.connect(this._render, this);
    _tracker.currentChanged.connect(this._follow, this);
    this._follow();
  }

  dispose(): void {
    clearInterval(this._ticker);
    clearTimeout(this._messageTimer);
    this._bind(null);
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

  /** The active notebook changed: its slice is the one marked "this notebook". */
  private _follow(): void {
    this._bind(this._tracker.currentWidget?.sessionContext ?? null);
    this._render();
  }

  private _bind(context: ISessionContext | null): void {
    if (this._context) {
      this._context.statusChanged.disconnect(this._render, this);
      this._context.kernelChanged.disconnect(this._render, this);
    }
    this._context = context;
    if (context) {
      context.statusChanged.connect(this._render, this);
      context.kernelChanged.connect(this._render, this);
    }
  }

  private _render(): void {
    if (this.isDisposed) {
      return;
    }
    const { state, error } = this._poller;
    const body: Node[] = [];
    if (this._message) {
      const close = el('button', 'jp-mig-MessageClose', '×');
      close.title = 'Dismiss';
      close.addEventListener('click', () => this._note(''));
      body.push(el('div', 'jp-mig-Message jp-mig-Note', this._message, close));
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
      const kernel = this._context?.session?.kernel ?? null;
      body.push(
        renderNode(state, {
          elapsedMs: Date.now() - this._poller.receivedAt,
          kernelLabel: id => this._notebookOf(id),
          activeKernel: kernel?.id ?? null,
          activeRunning: kernel?.status === 'busy',
          onRelease: (id, button) => void this._release(id, button),
          admin: state.admin === true,
          onAdminRelease: (slice, button) => void this._adminRelease(slice, button)
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

  /** A note above the map that clears itself (or on ×), so none outstays its news. */
  private _note(message: string): void {
    clearTimeout(this._messageTimer);
    this._message = message;
    if (message) {
      this._messageTimer = window.setTimeout(() => this._note(''), MESSAGE_MS);
    }
    this._render();
  }

  private async _release(kernelId: string, button: HTMLButtonElement): Promise<void> {
    const notebook = this._notebookOf(kernelId) ?? 'its notebook';
    const answer = await showDialog({
      title: 'Release this GPU slice?',
      body:
        `The slice of ${notebook} goes back to the pool for others. Its device data is kept ` +
        'on the host: the next GPU cell of that notebook leases a slice again and gets it back.',
      buttons: [Dialog.cancelButton(), Dialog.okButton({ label: 'Release' })]
    });
    if (!answer.button.accept) {
      return;
    }
    button.disabled = true;
    button.textContent = 'Releasing…';
    try {
      await this._api.release(kernelId);
      this._note(`Released the slice of ${notebook}; its data comes back with its next GPU cell.`);
    } catch (error) {
      this._note(`Release failed: ${(error as Error).message}`);
    }
    this._poller.refresh();
  }

  /** A broker admin ends another user's lease: the broker checks the right again. */
  private async _adminRelease(slice: ISlice, button: HTMLButtonElement): Promise<void> {
    const lease = slice.lease;
    if (!lease) {
      return;
    }
    const holder = slice.holder ?? 'another user';
    const answer = await showDialog({
      title: `Release the slice of ${holder}?`,
      body:
        `As a broker admin you end ${holder}'s lease ${lease.id} on ${slice.profile} now. ` +
        'Their device data on the slice is dropped, not kept: their next GPU cell leases a ' +
        'slice again and is told the data was lost.',
      buttons: [Dialog.cancelButton(), Dialog.warnButton({ label: 'Release' })]
    });
    if (!answer.button.accept) {
      return;
    }
    button.disabled = true;
    button.textContent = 'Releasing…';
    try {
      await this._api.releaseLease(lease.id);
      this._note(`Released the slice of ${holder} (lease ${lease.id}).`);
    } catch (error) {
      this._note(`Release failed: ${(error as Error).message}`);
    }
    this._poller.refresh();
  }

  private _context: ISessionContext | null = null;
  private _message = '';
  private _messageTimer = 0;
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
