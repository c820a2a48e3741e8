/**
 * The server extension's REST API under `<base_url>mig/api/` (mig_kernel/jupyter/server_extension.py),
 * called with jupyter_server's own authentication (ServerConnection settings: token, XSRF).
 */
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

export type SliceState = 'free' | 'warming' | 'leased' | 'draining' | 'broken';

export interface IGpu {
  index: number;
  uuid: string;
  name: string;
  card: string | null;
  memory_total: number;
  mig_enabled: boolean;
  memory_slots: number;
  simulated?: boolean;
}

export interface ISliceLease {
  id: string;
  expires_in: number | null;
  idle_timeout: number | null;
  created?: number;
}

export interface ISlice {
  id: string;
  uuid: string;
  gpu: number;
  profile: string;
  isolation: string;
  memory_total: number;
  memory_used: number;
  busy: number | null;
  state: SliceState;
  holder: string | null;
  mine: boolean;
  kernel_id: string | null;
  placement: { start: number; size: number } | null;
  lease: ISliceLease | null;
  idle_seconds?: number;
}

export interface IQueueEntry {
  position: number;
  profile: string | null;
  holder: string;
  mine: boolean;
  tag: string | null;
  waiting_seconds: number;
  kernel_id?: string | null;
  /** Why one's own request waits: `quota` (for one of one's own slices), `slice` (none free). */
  waiting_for?: 'quota' | 'slice' | null;
}

/** `GET slices`: the node as this user sees it (others anonymized). */
export interface INodeState {
  seq: number;
  pseudonym: string;
  node: string;
  backend: string;
  gpus: IGpu[];
  slices: ISlice[];
  queue: IQueueEntry[];
  /** Whether this user is a broker admin: may release any lease (`POST leases/<id>/release`). */
  admin?: boolean;
}

/** `GET kernels/<id>/lease`: the slice one kernel of this server holds or waits for. */
export interface IKernelLease {
  kernel_id: string;
  state: 'leased' | 'queued' | 'none';
  lease: {
    id: string;
    created: number;
    idle_timeout: number | null;
    slice: {
      id: string;
      uuid: string;
      profile: string;
      isolation: string;
      memory_total: number;
    };
  } | null;
  slice: ISlice | null;
  queue: { position: number; queue_length: number } | null;
}

/** `POST kernels/<id>/release`: the lease that ended, and what of its device data was kept. */
export interface IReleaseReply {
  released: string;
  spilled: Record<string, unknown> | boolean | null;
}

/**
 * A reply that was not 2xx. `fromApi`: the server extension answered (a JSON error), so a 404
 * means "no such kernel"; otherwise the route itself is missing (extension not enabled).
 */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly fromApi: boolean
  ) {
    super(message);
  }
}

export class MigApi {
  constructor(readonly settings: ServerConnection.ISettings = ServerConnection.makeSettings()) {}

  /** The node's slices; with `after`, waits (long poll) until the state's seq passes it. */
  slices(after?: number, timeout?: number, signal?: AbortSignal): Promise<INodeState> {
    const query: Record<string, string> = {};
    if (after !== undefined) {
      query.after = String(after);
      query.timeout = String(timeout ?? 30);
    }
    return this.request<INodeState>('slices', { method: 'GET', signal }, query);
  }

  kernelLease(kernelId: string, signal?: AbortSignal): Promise<IKernelLease> {
    return this.request<IKernelLease>(`kernels/${encodeURIComponent(kernelId)}/lease`, {
      method: 'GET',
      signal
    });
  }

  release(kernelId: string): Promise<IReleaseReply> {
    return this.request<IReleaseReply>(`kernels/${encodeURIComponent(kernelId)}/release`, {
      method: 'POST',
      body: '{}'
    });
  }

  /** As a broker admin: end any lease (its holder's device data on the slice is dropped). */
  releaseLease(leaseId: string): Promise<Record<string, unknown>> {
    return this.request<Record<string, unknown>>(`leases/${encodeURIComponent(leaseId)}/release`, {
      method: 'POST',
      body: '{}'
    });
  }

  private async request<T>(
    path: string,
    init: RequestInit,
    query: Record<string, string> = {}
  ): Promise<T> {
    const url =
      URLExt.join(this.settings.baseUrl, 'mig', 'api', path) + URLExt.objectToQueryString(query);
    let response: Response;
    try {
      response = await ServerConnection.makeRequest(url, init, this.settings);
    } catch (error) {
      if (init.signal?.aborted) {
        throw error;
      }
      throw new ServerConnection.NetworkError(error as TypeError);
    }
    const text = await response.text();
    let body: unknown = null;
    try {
      body = text ? JSON.parse(text) : null;
    } catch {
      body = null;
    }
    if (!response.ok) {
      const fromApi = body !== null && typeof body === 'object';
      const message = (fromApi && (body as { message?: string }).message) || response.statusText;
      throw new ApiError(
        response.status,
        `${init.method} ${path}: ${response.status} ${message}`,
        fromApi
      );
    }
    return body as T;
  }
}
