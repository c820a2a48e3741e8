/**
 * One long poll of `GET slices?after=SEQ` for the whole application: the status bar item and
 * the side panel listen to `changed` instead of polling on their own. A request returns when
 * the broker's state changes or after LONG_POLL_S; failures back off up to MAX_BACKOFF_MS.
 */
import { ISignal, Signal } from '@lumino/signaling';
import { IDisposable } from '@lumino/disposable';

import { INodeState, MigApi } from './api';

const LONG_POLL_S = 30;
const FIRST_BACKOFF_MS = 1000;
const MAX_BACKOFF_MS = 60000;

export class SlicePoller implements IDisposable {
  constructor(readonly api: MigApi) {}

  /** The latest state, or null before the first answer. */
  get state(): INodeState | null {
    return this._state;
  }

  /** Date.now() when `state` arrived: countdowns tick from there. */
  get receivedAt(): number {
    return this._receivedAt;
  }

  /** Why the last request failed, or null after a success. */
  get error(): Error | null {
    return this._error;
  }

  /** Emitted with each new state, and when a request fails (then `error` is set). */
  get changed(): ISignal<this, INodeState | null> {
    return this._changed;
  }

  get isDisposed(): boolean {
    return this._disposed;
  }

  start(): void {
    if (!this._running && !this._disposed) {
      this._running = true;
      void this._loop();
    }
  }

  /** Ask for the full state now (after a release, or on demand), ending the pending poll. */
  refresh(): void {
    this._full = true;
    this._request?.abort();
  }

  dispose(): void {
    if (this._disposed) {
      return;
    }
    this._disposed = true;
    this._request?.abort();
    Signal.clearData(this);
  }

  private async _loop(): Promise<void> {
    let backoff = FIRST_BACKOFF_MS;
    while (!this._disposed) {
      const request = (this._request = new AbortController());
      const after = this._full ? undefined : this._state?.seq;
      this._full = false;
      try {
        const state = await this.api.slices(after, LONG_POLL_S, request.signal);
        backoff = FIRST_BACKOFF_MS;
        const fresh = this._state === null || after === undefined || state.seq !== after;
        this._error = null;
        if (fresh) {
          this._state = state;
          this._receivedAt = Date.now();
          this._changed.emit(state);
        }
      } catch (error) {
        if (this._disposed) {
          return;
        }
        if (request.signal.aborted) {
          continue; // refresh(): ask again at once
        }
        this._error = error instanceof Error ? error : new Error(String(error));
        this._changed.emit(null);
        await this._sleep(backoff);
        backoff = Math.min(backoff * 2, MAX_BACKOFF_MS);
      }
    }
  }

  /** Waits `ms`, or less when refresh() or dispose() comes first. */
  private _sleep(ms: number): Promise<void> {
    return new Promise(resolve => {
      const request = (this._request = new AbortController());
      const timer = setTimeout(resolve, ms);
      request.signal.addEventListener('abort', () => {
        clearTimeout(timer);
        resolve();
      });
    });
  }

  private _state: INodeState | null = null;
  private _receivedAt = 0;
  private _error: Error | null = null;
  private _changed = new Signal<this, INodeState | null>(this);
  private _request: AbortController | null = null;
  private _full = false;
  private _running = false;
  private _disposed = false;
}
