/**
 * The active notebook's kernel and its GPU slice (`GET kernels/<id>/lease`), fetched again when
 * the notebook, its kernel or the kernel's status changes, and whenever the shared poller
 * reports a new broker state.
 */
import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { ISessionContext } from '@jupyterlab/apputils';
import { IDisposable } from '@lumino/disposable';
import { ISignal, Signal } from '@lumino/signaling';

import { ApiError, IKernelLease, MigApi } from './api';
import { SlicePoller } from './poller';

export const PROVISIONER_NAME = 'mig-provisioner';
const DEBOUNCE_MS = 150;

/** Whether the session's kernelspec launches through mig-provisioner (a mig kernel). */
export function isMigKernel(context: ISessionContext): boolean {
  const name = context.session?.kernel?.name ?? context.kernelPreference.name;
  const spec = name ? context.specsManager.specs?.kernelspecs[name] : undefined;
  const provisioner = (spec?.metadata as { kernel_provisioner?: { provisioner_name?: string } })
    ?.kernel_provisioner;
  return provisioner?.provisioner_name === PROVISIONER_NAME;
}

export class ActiveKernelLease implements IDisposable {
  constructor(
    private readonly _tracker: INotebookTracker,
    private readonly _api: MigApi,
    poller: SlicePoller
  ) {
    _tracker.currentChanged.connect(this._onCurrent, this);
    poller.changed.connect(this._schedule, this);
    this._onCurrent();
  }

  /** The lease answer for the current kernel, or null (no notebook, no kernel, unknown). */
  get lease(): IKernelLease | null {
    return this._lease;
  }

  /** Date.now() when `lease` arrived. */
  get receivedAt(): number {
    return this._receivedAt;
  }

  /** Whether the current notebook runs a mig kernel (by its kernelspec). */
  get isMig(): boolean {
    return this._isMig;
  }

  /** Hidden for a kernel that is not a mig kernel and holds no slice. */
  get visible(): boolean {
    return this._isMig || (this._lease !== null && this._lease.state !== 'none');
  }

  get error(): Error | null {
    return this._error;
  }

  /** Whether the notebook's kernel is running a cell now (its GPU call, for a GPU cell). */
  get running(): boolean {
    return this._context?.session?.kernel?.status === 'busy';
  }

  get changed(): ISignal<this, void> {
    return this._changed;
  }

  get isDisposed(): boolean {
    return this._disposed;
  }

  dispose(): void {
    if (this._disposed) {
      return;
    }
    this._disposed = true;
    this._bind(null);
    clearTimeout(this._timer);
    Signal.clearData(this);
  }

  private _onCurrent(): void {
    this._bind(this._tracker.currentWidget);
    this._schedule();
  }

  private _bind(panel: NotebookPanel | null): void {
    const old = this._context;
    if (old) {
      old.kernelChanged.disconnect(this._schedule, this);
      old.statusChanged.disconnect(this._schedule, this);
      old.specsManager.specsChanged.disconnect(this._schedule, this);
    }
    const context = (this._context = panel?.sessionContext ?? null);
    if (context) {
      context.kernelChanged.connect(this._schedule, this);
      context.statusChanged.connect(this._schedule, this);
      context.specsManager.specsChanged.connect(this._schedule, this);
    }
  }

  private _schedule(): void {
    clearTimeout(this._timer);
    this._timer = window.setTimeout(() => void this._fetch(), DEBOUNCE_MS);
  }

  private async _fetch(): Promise<void> {
    const generation = ++this._generation;
    const context = this._context;
    const kernelId = context?.session?.kernel?.id;
    let lease: IKernelLease | null = null;
    let error: Error | null = null;
    if (kernelId) {
      try {
        lease = await this._api.kernelLease(kernelId);
      } catch (e) {
        if (!(e instanceof ApiError && e.status === 404 && e.fromApi)) {
          error = e instanceof Error ? e : new Error(String(e));
        }
      }
    }
    if (generation !== this._generation || this._disposed) {
      return; // a later fetch started meanwhile
    }
    this._lease = lease;
    this._receivedAt = Date.now();
    this._error = error;
    this._isMig = context !== null && isMigKernel(context);
    this._changed.emit();
  }

  private _context: ISessionContext | null = null;
  private _lease: IKernelLease | null = null;
  private _receivedAt = 0;
  private _isMig = false;
  private _error: Error | null = null;
  private _generation = 0;
  private _timer = 0;
  private _disposed = false;
  private _changed = new Signal<this, void>(this);
}
