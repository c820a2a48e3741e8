/**
 * Text shown for slices: the same wording in the status bar, the panel and the notebook widget
 * (mig_kernel/partition_view.py): memory as `0.38/9.75 GiB` everywhere.
 */
import { IKernelLease, ISlice } from './api';

const GIB = 1024 ** 3;
/** A busy share from which a slice shows as computing (partition_view.COMPUTING). */
export const COMPUTING = 0.01;

/** `0.38` for 0.38 GiB (two decimals, as the notebook widget and `%gpu status`). */
export function gib(bytes: number): string {
  return (bytes / GIB).toFixed(2);
}

/** `0.38/9.75 GiB` */
export function memory(used: number, total: number): string {
  return `${gib(used)}/${gib(total)} GiB`;
}

/** `9:32`, or `1:02:05` past an hour; seconds are rounded up so 0:00 means gone. */
export function countdown(seconds: number): string {
  const s = Math.max(0, Math.ceil(seconds));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const ss = String(s % 60).padStart(2, '0');
  return h > 0 ? `${h}:${String(m).padStart(2, '0')}:${ss}` : `${m}:${ss}`;
}

/**
 * What kind of slice this is, as its first word: "MIG" only for a MIG device
 * (design.md: never claim MIG for a slice that is not one), "GPU" for a GPU or a share of one,
 * and for a simulated slice (whose isolation, `sim`, is shown too).
 */
export function kind(isolation: string): string {
  return isolation === 'mig' ? 'MIG' : 'GPU';
}

/** Seconds left before an idle reclaim, `elapsedMs` after the answer that said `expiresIn`. */
export function remaining(expiresIn: number | null | undefined, elapsedMs: number): number | null {
  return expiresIn === null || expiresIn === undefined ? null : expiresIn - elapsedMs / 1000;
}

/** Whether the broker saw the slice run calls in its last interval. */
export function computing(slice: ISlice | null | undefined): boolean {
  return !!slice && slice.state === 'leased' && (slice.busy ?? 0) >= COMPUTING;
}

/** `busy 40%` for a leased slice, or '' when the broker has no figure. */
export function busy(slice: ISlice): string {
  if (slice.busy === null || slice.busy === undefined || slice.state !== 'leased') {
    return '';
  }
  return `busy ${Math.round(slice.busy * 100)}%`;
}

/**
 * The status bar text for one kernel: `MIG 1g.10gb · 0.38/9.75 GiB · idle 9:32 · mig`; while
 * its notebook runs a cell (`running`), that instead of the idle countdown.
 */
export function statusText(lease: IKernelLease, elapsedMs: number, running = false): string {
  if (lease.state === 'queued') {
    const position = lease.queue ? ` #${lease.queue.position}` : '';
    return `GPU slice: queued${position}`;
  }
  const slice: ISlice | null = lease.slice;
  const info = slice ?? lease.lease?.slice;
  if (lease.state !== 'leased' || !info) {
    return 'GPU slice: none';
  }
  const parts = [`${kind(info.isolation)} ${info.profile}`];
  parts.push(memory(slice?.memory_used ?? 0, info.memory_total));
  const left = remaining(slice?.lease?.expires_in, elapsedMs);
  if (running || computing(slice)) {
    parts.push('running');
  } else if (left !== null) {
    parts.push(`idle ${countdown(left)}`);
  }
  parts.push(info.isolation);
  return parts.join(' · ');
}
