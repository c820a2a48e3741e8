/**
 * The node's partition map as DOM: the queue first (what waits, and why), then per GPU a column
 * of its MIG memory slots with each instance drawn over the slots its placement covers (slices
 * without a placement, such as `process` shares, as equal rows). Every slice is coloured and
 * labelled by state; the active notebook's own slice says "this notebook", the user's other
 * slices "yours", others' their pseudonym; a slice running calls says "computing".
 *
 * A slice is two or three short lines (a free one, two), so seven slices of a GPU, or four GPUs
 * of them, stay a compact list.
 */
import { IGpu, INodeState, IQueueEntry, ISlice } from './api';
import { el } from './dom';
import { busy, computing, countdown, gib, memory, remaining } from './format';

export interface IRenderOptions {
  /** Milliseconds since the state arrived (for idle countdowns). */
  elapsedMs: number;
  /** The notebook (session path) of a kernel of this server, when known. */
  kernelLabel: (kernelId: string) => string | null;
  /** The kernel of the active notebook: its slice is "this notebook". */
  activeKernel: string | null;
  /** Whether the active notebook's kernel is running a cell now. */
  activeRunning: boolean;
  /** The user clicked "Release" on an own slice held by that kernel. */
  onRelease: (kernelId: string, button: HTMLButtonElement) => void;
  /** Whether the user is a broker admin: others' slices get a Release button too. */
  admin: boolean;
  /** An admin clicked "Release" on another user's slice. */
  onAdminRelease: (slice: ISlice, button: HTMLButtonElement) => void;
}

export function renderNode(state: INodeState, options: IRenderOptions): HTMLElement {
  const root = el('div', 'jp-mig-Node');
  const leased = state.slices.filter(s => s.state === 'leased').length;
  const yours = state.slices.filter(s => s.mine).length;
  const count = state.slices.length === 1 ? '1 slice' : `${state.slices.length} slices`;
  const mine = yours ? `, ${yours} yours` : '';
  root.append(
    el(
      'div',
      'jp-mig-Summary',
      `${state.node} · ${state.backend} · ${count}, ${leased} leased${mine}`
    )
  );
  root.append(renderQueue(state.queue, options));
  for (const gpu of gpusOf(state)) {
    const slices = state.slices.filter(s => s.gpu === gpu.index);
    root.append(renderGpu(gpu, slices, options));
  }
  return root;
}

/** The GPUs to draw: those the node lists, plus any a slice names that the list lacks. */
function gpusOf(state: INodeState): IGpu[] {
  const gpus = [...state.gpus];
  for (const slice of state.slices) {
    if (!gpus.some(g => g.index === slice.gpu)) {
      gpus.push({
        index: slice.gpu,
        uuid: '',
        name: `GPU ${slice.gpu}`,
        card: null,
        memory_total: 0,
        mig_enabled: false,
        memory_slots: 0
      });
    }
  }
  return gpus.sort((a, b) => a.index - b.index);
}

function renderGpu(gpu: IGpu, slices: ISlice[], options: IRenderOptions): HTMLElement {
  const mode = gpu.mig_enabled ? 'MIG' : 'no MIG';
  const sim = gpu.simulated ? ', simulated' : '';
  const size = gpu.memory_total ? ` · ${gib(gpu.memory_total)} GiB` : '';
  const section = el(
    'section',
    'jp-mig-Gpu',
    el('h3', 'jp-mig-GpuTitle', `GPU ${gpu.index} · ${gpu.card ?? gpu.name}${size} (${mode}${sim})`)
  );
  section.dataset.migGpu = String(gpu.index);
  const placed = slices.filter(s => s.placement !== null);
  const shares = slices.filter(s => s.placement === null);
  const slots = Math.max(
    gpu.memory_slots,
    ...placed.map(s => s.placement!.start + s.placement!.size)
  );
  const map = el('div', 'jp-mig-Map');
  const rows = (placed.length ? slots : 0) + shares.length;
  map.style.gridTemplateRows = `repeat(${Math.max(rows, 1)}, minmax(1.6em, auto))`;
  if (placed.length) {
    for (let slot = 0; slot < slots; slot++) {
      const label = el('div', 'jp-mig-SlotLabel', String(slot));
      label.title = `memory slot ${slot}`;
      label.style.gridRow = `${slot + 1}`;
      map.append(label);
    }
    const covered = new Array<boolean>(slots).fill(false);
    for (const slice of placed) {
      const { start, size } = slice.placement!;
      covered.fill(true, start, start + size);
      map.append(place(renderSlice(slice, options), start, size));
    }
    for (const [start, size] of gaps(covered)) {
      // The notebook widget's word too: memory slots no instance was made on.
      const gap = el('div', 'jp-mig-Unallocated', 'unallocated');
      map.append(place(gap, start, size));
    }
  }
  shares.forEach((slice, i) => {
    const row = (placed.length ? slots : 0) + i;
    const label = el('div', 'jp-mig-SlotLabel', `${i + 1}/${shares.length}`);
    label.title = 'an equal share of the GPU';
    label.style.gridRow = `${row + 1}`;
    map.append(label, place(renderSlice(slice, options), row, 1));
  });
  if (!slices.length) {
    map.append(el('div', 'jp-mig-Empty', 'no slices'));
  }
  section.append(map);
  return section;
}

function place(node: HTMLElement, start: number, size: number): HTMLElement {
  node.style.gridRow = `${start + 1} / span ${size}`;
  node.style.gridColumn = '2';
  return node;
}

/** Runs of uncovered slots as [start, size]. */
function gaps(covered: boolean[]): [number, number][] {
  const runs: [number, number][] = [];
  covered.forEach((c, i) => {
    const last = runs[runs.length - 1];
    if (c) {
      return;
    }
    if (last && last[0] + last[1] === i) {
      last[1] += 1;
    } else {
      runs.push([i, 1]);
    }
  });
  return runs;
}

function renderSlice(slice: ISlice, options: IRenderOptions): HTMLElement {
  const node = el('div', `jp-mig-Slice jp-mig-state-${slice.state}`);
  const here = slice.mine && !!slice.kernel_id && slice.kernel_id === options.activeKernel;
  const active = computing(slice) || (here && options.activeRunning);
  node.dataset.migSlice = slice.id;
  node.dataset.migState = slice.state;
  node.dataset.migMine = String(slice.mine);
  node.dataset.migThis = String(here);
  node.dataset.migBusy = String(active);
  node.classList.toggle('jp-mig-mine', slice.mine);
  node.classList.toggle('jp-mig-this', here);
  const head = el(
    'div',
    'jp-mig-SliceHead',
    el('span', 'jp-mig-Profile', slice.profile),
    el('span', `jp-mig-Badge jp-mig-Badge-${slice.state}`, slice.state)
  );
  if (here) {
    head.append(el('span', 'jp-mig-Badge jp-mig-This', 'this notebook'));
  } else if (slice.mine) {
    head.append(el('span', 'jp-mig-Badge jp-mig-Yours', 'yours'));
  }
  if (active) {
    const activity = el('span', 'jp-mig-Activity', el('span', 'jp-mig-Pulse'), 'computing');
    activity.title = computing(slice)
      ? 'The slice ran calls in the last few seconds'
      : "This notebook's kernel is running a cell";
    head.append(activity);
  }
  if (slice.mine && slice.kernel_id) {
    const kernelId = slice.kernel_id;
    const button = el('button', 'jp-mig-Release', 'Release');
    button.title =
      'Give the slice back to the pool; its device data is kept and comes back ' +
      "with the kernel's next GPU cell";
    button.addEventListener('click', () => options.onRelease(kernelId, button));
    head.append(button);
  } else if (options.admin && !slice.mine && slice.lease) {
    const button = el('button', 'jp-mig-Release jp-mig-AdminRelease', 'Release');
    button.dataset.migAdmin = 'true';
    button.title =
      `As a broker admin: end the lease of ${slice.holder ?? 'its holder'}; ` +
      'their device data on the slice is dropped';
    button.addEventListener('click', () => options.onAdminRelease(slice, button));
    head.append(button);
  }
  // The isolation is the GPU's title ("MIG, simulated", "no MIG") and the tooltip's: one line
  // fewer per slice, so a narrow panel holds a GPU's seven slices.
  const facts = [memory(slice.memory_used, slice.memory_total)];
  const load = busy(slice);
  if (load && !computing(slice) && load !== 'busy 0%') {
    facts.push(load);
  }
  const details = el('div', 'jp-mig-SliceFacts', facts.join(' · '));
  const expires = slice.mine ? slice.lease?.expires_in : null;
  if (expires !== null && expires !== undefined) {
    const clock = el('span', 'jp-mig-Countdown');
    clock.dataset.migExpires = String(expires);
    clock.textContent = idleText(expires, options.elapsedMs);
    clock.title = 'Time left before the slice goes back to the pool (your data is kept)';
    details.append(' · ', clock);
  }
  node.append(head, details);
  const who = here ? '' : holderText(slice, options);
  if (who) {
    node.append(el('div', 'jp-mig-Holder', who));
  }
  node.title = `${slice.id} (${slice.uuid}) · isolation ${slice.isolation}`;
  return node;
}

function holderText(slice: ISlice, options: IRenderOptions): string {
  if (slice.state === 'broken') {
    return 'out of service';
  }
  if (!slice.holder) {
    return '';
  }
  if (!slice.mine) {
    return `held by ${slice.holder}`;
  }
  const notebook = slice.kernel_id ? options.kernelLabel(slice.kernel_id) : null;
  if (notebook) {
    return `in ${notebook}`;
  }
  return slice.kernel_id ? 'in a kernel of yours' : ''; // outside this server: the badge says it
}

export function idleText(expiresIn: number, elapsedMs: number): string {
  return `idle ${countdown(remaining(expiresIn, elapsedMs) ?? 0)}`;
}

export function waitingText(waitingSeconds: number, elapsedMs: number): string {
  return `waiting ${countdown(waitingSeconds + elapsedMs / 1000)}`;
}

function renderQueue(queue: IQueueEntry[], options: IRenderOptions): HTMLElement {
  const section = el('section', 'jp-mig-Queue');
  section.dataset.migQueue = String(queue.length);
  const waiting = queue.length === 1 ? '1 request waiting' : `${queue.length} requests waiting`;
  section.append(el('h3', 'jp-mig-GpuTitle', `Queue: ${queue.length ? waiting : 'empty'}`));
  if (queue.length) {
    const list = el('ol', 'jp-mig-QueueList');
    for (const entry of queue) {
      list.append(renderWaiter(entry, options));
    }
    section.append(list);
  }
  return section;
}

function renderWaiter(entry: IQueueEntry, options: IRenderOptions): HTMLElement {
  let who = entry.holder;
  if (entry.mine) {
    const notebook = entry.kernel_id ? options.kernelLabel(entry.kernel_id) : null;
    who = notebook ? `you (${notebook})` : 'you';
  }
  const clock = el('span', 'jp-mig-Waiting', waitingText(entry.waiting_seconds, options.elapsedMs));
  clock.dataset.migWaiting = String(entry.waiting_seconds);
  const item = el(
    'li',
    entry.mine ? 'jp-mig-mine' : '',
    `#${entry.position} ${entry.profile ?? 'any slice'} · ${who} · `,
    clock
  );
  if (entry.waiting_for === 'quota') {
    const why = el('div', 'jp-mig-Why', 'waits for one of your slices: release one below');
    why.title =
      'You hold as many slices as one user may; this request gets the next one you release';
    item.append(why);
  }
  item.dataset.migWaitingFor = entry.waiting_for ?? '';
  return item;
}
