import { LabIcon } from '@jupyterlab/ui-components';

/** A chip with pins: the side panel's tab. */
const svg = `<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 24 24">
  <g class="jp-icon3" fill="#616161">
    <path d="M7 5h10a2 2 0 0 1 2 2v10a2 2 0 0 1-2 2H7a2 2 0 0 1-2-2V7a2 2 0 0 1 2-2zm1 3v8h8V8z"/>
    <rect x="9" y="1" width="2" height="3"/><rect x="13" y="1" width="2" height="3"/>
    <rect x="9" y="20" width="2" height="3"/><rect x="13" y="20" width="2" height="3"/>
    <rect x="1" y="9" width="3" height="2"/><rect x="1" y="13" width="3" height="2"/>
    <rect x="20" y="9" width="3" height="2"/><rect x="20" y="13" width="3" height="2"/>
  </g>
</svg>`;

export const gpuIcon = new LabIcon({ name: 'mig-kernel:gpu', svgstr: svg });
