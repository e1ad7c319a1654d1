/*
 * syncfed's line charts: a few series of [x, y] points drawn as SVG, nothing more.
 * Copyright the syncfed authors. Licensed under the Apache License, Version 2.0
 * (the syncfed package's licence). Written for the dashboard so that it needs no
 * library from a CDN and works offline.
 *
 * Usage: SyncfedChart.draw(svgElement, [{name: "federated", points: [[1, 0.87], [2, 0.91]]}],
 *                          {format: (y) => y.toFixed(2), xLabel: "round"});
 * Each series becomes a <polyline data-name=... data-points=N>, which tests count.
 */
"use strict";

const SyncfedChart = (() => {
  const NS = "http://www.w3.org/2000/svg";
  const WIDTH = 420, PLOT_HEIGHT = 190, LEFT = 48, RIGHT = 14, TOP = 10, AXIS = 34, LEGEND_ROW = 16;
  const COLOURS = ["#1f5fbf", "#d9480f", "#2b8a3e", "#862e9c", "#c2255c", "#0b7285", "#e67700", "#495057"];

  function element(parent, name, attributes, text) {
    const node = document.createElementNS(NS, name);
    for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, String(value));
    if (text !== undefined) node.textContent = text;
    parent.appendChild(node);
    return node;
  }

  /* About `count` round ticks covering [low, high]: steps of 1, 2 or 5 times a power of ten. */
  function ticks(low, high, count) {
    const raw = (high - low) / Math.max(count, 1);
    const power = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 5, 10].map((m) => m * power).find((s) => raw <= s);
    const values = [];
    for (let v = Math.ceil(low / step) * step; v <= high + step * 1e-9; v += step) values.push(+v.toPrecision(12));
    return values;
  }

  function extent(values, pad) {
    let low = Math.min(...values), high = Math.max(...values);
    if (low === high) { const d = Math.abs(low) * 0.1 || 1; low -= d; high += d; }
    else { const d = (high - low) * pad; low -= d; high += d; }
    return [low, high];
  }

  function draw(svg, series, options) {
    const format = (options && options.format) || ((y) => String(+y.toPrecision(3)));
    const xLabel = (options && options.xLabel) || "round";
    const lines = series.filter((s) => s.points.length > 0);
    const perRow = 3;
    const legendRows = Math.ceil(lines.length / perRow);
    const height = TOP + PLOT_HEIGHT + AXIS + legendRows * LEGEND_ROW + 4;
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    svg.setAttribute("viewBox", `0 0 ${WIDTH} ${height}`);
    svg.setAttribute("class", "chart");
    if (lines.length === 0) {
      element(svg, "text", {x: WIDTH / 2, y: TOP + PLOT_HEIGHT / 2, "text-anchor": "middle", class: "empty"}, "no data yet");
      return;
    }
    const xs = lines.flatMap((s) => s.points.map((p) => p[0]));
    const ys = lines.flatMap((s) => s.points.map((p) => p[1]));
    const [x0, x1] = extent(xs, 0);
    const [y0, y1] = extent(ys, 0.08);
    const right = WIDTH - RIGHT, bottom = TOP + PLOT_HEIGHT;
    const sx = (x) => LEFT + ((x - x0) / (x1 - x0)) * (right - LEFT);
    const sy = (y) => bottom - ((y - y0) / (y1 - y0)) * PLOT_HEIGHT;

    for (const y of ticks(y0, y1, 5)) {
      element(svg, "line", {x1: LEFT, x2: right, y1: sy(y), y2: sy(y), class: "grid"});
      element(svg, "text", {x: LEFT - 6, y: sy(y) + 4, "text-anchor": "end"}, format(y));
    }
    for (const x of ticks(x0, x1, 6).filter((x) => Number.isInteger(x))) {
      element(svg, "line", {x1: sx(x), x2: sx(x), y1: bottom, y2: bottom + 4, class: "axis"});
      element(svg, "text", {x: sx(x), y: bottom + 16, "text-anchor": "middle"}, String(x));
    }
    element(svg, "line", {x1: LEFT, x2: right, y1: bottom, y2: bottom, class: "axis"});
    element(svg, "line", {x1: LEFT, x2: LEFT, y1: TOP, y2: bottom, class: "axis"});
    element(svg, "text", {x: (LEFT + right) / 2, y: bottom + 30, "text-anchor": "middle"}, xLabel);

    lines.forEach((s, i) => {
      const colour = COLOURS[i % COLOURS.length];
      const points = s.points.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ");
      const line = element(svg, "polyline", {points, class: "line", stroke: colour, "data-name": s.name, "data-points": s.points.length});
      element(line, "title", {}, s.name);
      if (s.points.length <= 60) {
        for (const p of s.points) {
          const dot = element(svg, "circle", {cx: sx(p[0]).toFixed(1), cy: sy(p[1]).toFixed(1), r: 2.5, fill: colour});
          element(dot, "title", {}, `${s.name}, ${xLabel} ${p[0]}: ${format(p[1])}`);
        }
      }
      const column = i % perRow, row = Math.floor(i / perRow);
      const lx = LEFT + column * ((right - LEFT) / perRow), ly = bottom + AXIS + row * LEGEND_ROW + 8;
      element(svg, "line", {x1: lx, x2: lx + 16, y1: ly - 4, y2: ly - 4, stroke: colour, "stroke-width": 3});
      element(svg, "text", {x: lx + 22, y: ly}, s.name);
    });
  }

  return {draw, ticks};
})();
