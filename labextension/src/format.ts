/** Text shown for slices: the same wording in the status bar and in the panel. */
import { IKernelLease, ISlice } from './api';

const GIB = 1024 ** 3;

/** `0.4` for 0.4 GiB (one decimal). */
export function gib(bytes: number): string {
  return (bytes / GIB).toFixed(1);
}

/** `0.4/9.8 GiB` */
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

/** `busy 40%`, or '' when the broker has no figure. */
export function busy(share: number | null): string {
  return share === null ? '' : `busy ${Math.round(share * 100)}%`;
}

/** The status bar text for one kernel: `MIG 1g.10gb · 0.4/9.8 GiB · idle 9:32 · mig`. */
export function statusText(lease: IKernelLease, elapsedMs: number): string {
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
  if (left !== null) {
    parts.push(`idle ${countdown(left)}`);
  }
  parts.push(info.isolation);
  return parts.join(' · ');
}
