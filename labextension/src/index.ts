/**
 * mig-kernel's JupyterLab extension: the active notebook kernel's GPU slice in the status bar,
 * and the node's partition map in the right side panel "GPU slices". Both read the server
 * extension's REST API (`<base_url>mig/api/`) through one shared long poll.
 */
import { ILayoutRestorer, JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { ICommandPalette } from '@jupyterlab/apputils';
import { INotebookTracker } from '@jupyterlab/notebook';
import { IStatusBar } from '@jupyterlab/statusbar';

import { MigApi } from './api';
import { gpuIcon } from './icon';
import { ActiveKernelLease } from './kernel';
import { createPanel, PANEL_ID, PartitionView } from './panel';
import { SlicePoller } from './poller';
import { SliceStatusItem } from './statusitem';

export const OPEN_PANEL = 'mig-kernel:open-panel';

const plugin: JupyterFrontEndPlugin<void> = {
  id: '@mig-kernel/labextension:plugin',
  description:
    "A notebook kernel's GPU slice in the status bar; the node's slices in a side panel.",
  autoStart: true,
  requires: [INotebookTracker],
  optional: [IStatusBar, ILayoutRestorer, ICommandPalette],
  activate: (
    app: JupyterFrontEnd,
    tracker: INotebookTracker,
    statusBar: IStatusBar | null,
    restorer: ILayoutRestorer | null,
    palette: ICommandPalette | null
  ): void => {
    const api = new MigApi(app.serviceManager.serverSettings);
    const poller = new SlicePoller(api);

    const view = new PartitionView(api, poller, app.serviceManager.sessions, tracker);
    const panel = createPanel(view);
    app.shell.add(panel, 'right', { rank: 900 });
    restorer?.add(panel, PANEL_ID);

    app.commands.addCommand(OPEN_PANEL, {
      label: 'Show GPU Slices',
      caption: "The node's GPU slices: who holds what, your own slice, the queue",
      icon: gpuIcon,
      execute: () => app.shell.activateById(PANEL_ID)
    });
    palette?.addItem({ command: OPEN_PANEL, category: 'GPU' });

    if (statusBar) {
      const model = new ActiveKernelLease(tracker, api, poller);
      const item = new SliceStatusItem(model);
      item.node.addEventListener('click', () => void app.commands.execute(OPEN_PANEL));
      statusBar.registerStatusItem('mig-kernel:slice', {
        item,
        align: 'left',
        rank: 4,
        isActive: () => model.visible,
        activeStateChanged: model.changed
      });
    }
    poller.start();
  }
};

export default plugin;
