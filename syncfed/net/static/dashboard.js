/*
 * syncfed dashboard: polls /api/state and draws the workers, the jobs and each running job's curves.
 * Copyright the syncfed authors. Licensed under the Apache License, Version 2.0.
 * Every value from the service is set as text (textContent), never as markup.
 */
"use strict";

(() => {
  const POLL_MS = 1500;
  const METRICS = {
    accuracy: {title: "Accuracy", format: (y) => `${+(100 * y).toPrecision(3)}%`},
    auc: {title: "AUC", format: (y) => y.toFixed(3)},
    mae: {title: "MAE", format: (y) => String(+y.toPrecision(3))},
    loss: {title: "Loss", format: (y) => String(+y.toPrecision(3))},
  };

  function cell(row, text, className) {
    const td = document.createElement("td");
    td.textContent = text;
    if (className) td.className = className;
    row.appendChild(td);
    return td;
  }

  function ago(seconds) {
    if (seconds < 1) return "now";
    if (seconds < 90) return `${Math.round(seconds)} s ago`;
    if (seconds < 5400) return `${Math.round(seconds / 60)} min ago`;
    if (seconds < 172800) return `${Math.round(seconds / 3600)} h ago`;
    return `${Math.round(seconds / 86400)} d ago`;
  }

  function fill(table, rows) {
    const body = table.querySelector("tbody");
    body.replaceChildren(...rows);
  }

  function workers(state) {
    fill(document.getElementById("workers"), state.workers.map((w) => {
      const row = document.createElement("tr");
      row.dataset.worker = w.id;
      cell(row, w.id);
      cell(row, w.role || "-");
      const seen = w.last_seen === null ? "never connected" : `last seen ${ago(state.time - w.last_seen)}`;
      cell(row, w.connected ? `connected, ${seen}` : `disconnected, ${seen}`, w.connected ? "connected" : "disconnected");
      cell(row, w.rtt_ms === null ? "-" : `${w.rtt_ms.toFixed(1)} ms`, "number");
      cell(row, w.data || "-");
      cell(row, w.version || "-");
      cell(row, w.job || "-");
      return row;
    }));
  }

  function result(job) {
    if (job.reason) return job.reason;
    const refusals = Object.entries(job.refusals || {}).map(([site, why]) => `${site} refused: ${why}`);
    const figures = Object.entries(job.result || {}).map(([name, value]) =>
      typeof value === "number" ? `${name} ${+value.toPrecision(4)}` : `${name} ${value}`);
    return [...figures, ...refusals].join("; ") || "-";
  }

  function jobs(state) {
    fill(document.getElementById("jobs"), state.jobs.map((job) => {
      const row = document.createElement("tr");
      row.dataset.job = job.id;
      cell(row, job.id);
      cell(row, job.name);
      cell(row, job.state, `state-${job.state}`);
      const progress = cell(row, `${job.round}/${job.rounds}`, "number");
      const bar = document.createElement("progress");
      bar.max = Math.max(job.rounds, 1);
      bar.value = job.round;
      progress.prepend(bar);
      cell(row, job.submitted_by);
      cell(row, [...job.workers, ...(job.evaluator ? [`${job.evaluator} (evaluator)`] : [])].join(", "));
      cell(row, result(job));
      return row;
    }));
  }

  function figure(parent, key) {
    const box = document.createElement("figure");
    const caption = document.createElement("figcaption");
    const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    svg.dataset.chart = key;
    box.append(caption, svg);
    parent.appendChild(box);
    return box;
  }

  function panel(section, job) {
    let box = section.querySelector(`div.job[data-job="${CSS.escape(job.id)}"]`);
    if (box === null) {
      box = document.createElement("div");
      box.className = "job";
      box.dataset.job = job.id;
      box.appendChild(document.createElement("h2"));
      const charts = document.createElement("div");
      charts.className = "charts";
      for (const key of ["scores", "seconds", "epsilon"]) figure(charts, key);
      box.appendChild(charts);
      section.appendChild(box);
    }
    return box;
  }

  function draw(box, key, title, series, format) {
    const svg = box.querySelector(`svg[data-chart="${key}"]`);
    svg.parentNode.querySelector("figcaption").textContent = title;
    SyncfedChart.draw(svg, series, {format});
  }

  function running(state) {
    const section = document.getElementById("running");
    const live = state.jobs.filter((job) => job.state === "running" && state.curves[job.id]);
    const ids = new Set(live.map((job) => job.id));
    for (const box of section.querySelectorAll("div.job")) if (!ids.has(box.dataset.job)) box.remove();
    document.getElementById("idle").hidden = live.length > 0;
    for (const job of live) {
      const curves = state.curves[job.id];
      const box = panel(section, job);
      box.querySelector("h2").textContent = `Running: ${job.name} (${job.id}), round ${job.round}/${job.rounds}`;
      const metric = METRICS[curves.metric] || {title: curves.metric || "Score", format: undefined};
      draw(box, "scores", `${metric.title} per round`, curves.scores, metric.format);
      draw(box, "seconds", "Round time (s)", curves.seconds, (y) => String(+y.toPrecision(3)));
      const spent = curves.epsilon.length ? "Privacy spent (epsilon)" : "Privacy spent (epsilon): no DP in this job";
      draw(box, "epsilon", spent, curves.epsilon, (y) => String(+y.toPrecision(3)));
    }
  }

  function status(text, error) {
    const node = document.getElementById("status");
    node.textContent = text;
    node.className = error ? "status error" : "status";
  }

  async function poll() {
    try {
      const response = await fetch("/api/state", {cache: "no-store", credentials: "same-origin"});
      if (response.status === 401) {
        status("not signed in: open the dashboard's link with its token, or present a viewer certificate", true);
      } else if (!response.ok) {
        status(`the service did not answer: ${(await response.json()).error || response.status}`, true);
      } else {
        const state = await response.json();
        workers(state);
        jobs(state);
        running(state);
        status(`updated ${new Date(state.time * 1000).toLocaleTimeString()}`, false);
      }
    } catch (error) {
      status(`cannot reach the service: ${error.message}`, true);
    }
    setTimeout(poll, POLL_MS);
  }

  poll();
})();
