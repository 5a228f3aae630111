// crv trace viewer: verify a trace, colour steps by p_faulty, draw a step's pruned attribution graph (plain SVG).
"use strict";
const $ = (id) => document.getElementById(id);
const EXAMPLES = [
  { name: "arith: the reasoner's own mistake (11*47=587)", task: "arith", question: "4+((5+6)*(2+(9*5)))",
    steps: ["5+6=11 => 4+(11*(2+(9*5)))", "9*5=45 => 4+(11*(2+45))", "2+45=47 => 4+(11*47)", "11*47=587 => 4+587"] },
  { name: "arith: the same, corrected", task: "arith", question: "4+((5+6)*(2+(9*5)))",
    steps: ["5+6=11 => 4+(11*(2+(9*5)))", "9*5=45 => 4+(11*(2+45))", "2+45=47 => 4+(11*47)", "11*47=517 => 4+517"] },
  { name: "bool: correct", task: "bool", question: "(True and False) or (not False)",
    steps: ["True and False=False => False or (not False)", "not False=True => False or True", "False or True=True => True"] },
];
let last = null;

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("apikey").value.trim();
  if (key) h["X-API-Key"] = key;
  return h;
}

function colour(p) {  // green (0) -> red (1)
  const r = Math.round(255 * Math.min(1, 2 * p)), g = Math.round(255 * Math.min(1, 2 * (1 - p)));
  return `rgba(${r}, ${g}, 80, 0.35)`;
}

async function post(path, body) {
  const res = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body) });
  const data = await res.json();
  if (!res.ok) throw new Error(`${res.status}: ${data.detail}`);
  return data;
}

async function verify() {
  const steps = $("steps").value.split("\n").map((s) => s.trim()).filter((s) => s);
  const body = { task: $("task").value, question: $("question").value.trim(), steps, include_graph: true };
  $("status").textContent = "verifying…";
  try {
    last = { request: body, response: await post("/v1/verify", body) };
    $("status").textContent = `${steps.length} steps in ${last.response.elapsed_ms.toFixed(0)} ms`;
    showSteps();
  } catch (e) { $("status").textContent = e.message; }
}

function showSteps() {
  const list = $("steplist");
  list.innerHTML = "";
  last.response.steps.forEach((s) => {
    const li = document.createElement("li");
    li.dataset.index = s.index;
    li.dataset.pFaulty = s.p_faulty.toFixed(4);
    li.className = s.flagged ? "step flagged" : "step";
    li.style.background = colour(s.p_faulty);
    li.textContent = `${s.text}    p_faulty ${s.p_faulty.toFixed(2)}${s.flagged ? "  ⚑ flagged" : ""}`;
    li.addEventListener("click", () => showStep(s.index));
    list.appendChild(li);
  });
}

function showStep(i) {
  const s = last.response.steps[i];
  document.querySelectorAll("#steplist li").forEach((li) => li.classList.toggle("selected", +li.dataset.index === i));
  $("detail").hidden = false;
  $("detail-title").textContent = `Step ${i}: ${s.text}`;
  const rows = s.top_features.map((f) => `<tr class="feature-row" data-layer="${f.layer}" data-feature="${f.feature}">` +
    `<td>${f.layer}</td><td>${f.position}</td><td>${f.feature}</td><td>${f.influence.toFixed(4)}</td>` +
    `<td>${f.description ? escapeHtml(f.description) : ""}</td></tr>`);
  $("top-features").innerHTML = `<table><tr><th>layer</th><th>position</th><th>feature</th><th>influence</th>` +
    `<th>description</th></tr>${rows.join("")}</table>`;
  document.querySelectorAll("#top-features tr.feature-row").forEach((tr) =>
    tr.addEventListener("click", () => showFeature(+tr.dataset.layer, +tr.dataset.feature)));
  $("feature-card").hidden = true;
  drawGraph(s.graph);
  $("intervene").dataset.index = i;
  $("intervene-out").textContent = "";
}

function drawGraph(g) {
  const svg = $("graph");
  svg.innerHTML = "";
  if (!g) return;
  const W = svg.clientWidth || 900, H = svg.clientHeight || 360, pad = 24;
  const rows = g.n_layers + 2;  // tokens, layers..., logits
  const row = (n) => (n.kind === "token" ? 0 : n.kind === "logit" ? rows - 1 : n.layer + 1);
  const x = (n) => pad + (W - 2 * pad) * (n.position + 0.5) / g.n_positions;
  const y = (n) => H - pad - (H - 2 * pad) * row(n) / (rows - 1);
  const ns = "http://www.w3.org/2000/svg";
  const maxW = Math.max(1e-9, ...g.edges.map((e) => Math.abs(e.weight)));
  g.edges.forEach((e) => {
    const a = g.nodes[e.source], b = g.nodes[e.target], line = document.createElementNS(ns, "line");
    line.setAttribute("x1", x(a)); line.setAttribute("y1", y(a)); line.setAttribute("x2", x(b)); line.setAttribute("y2", y(b));
    line.setAttribute("stroke", e.weight >= 0 ? "#2e86c1" : "#c0392b");
    line.setAttribute("stroke-opacity", 0.15 + 0.85 * Math.abs(e.weight) / maxW);
    svg.appendChild(line);
  });
  const fill = { feature: "#243447", error: "#aaa", token: "#27ae60", logit: "#e67e22" };
  g.nodes.forEach((n) => {
    const c = document.createElementNS(ns, "circle");
    c.setAttribute("cx", x(n)); c.setAttribute("cy", y(n)); c.setAttribute("r", n.kind === "feature" ? 4 : 3);
    c.setAttribute("fill", fill[n.kind]);
    c.setAttribute("class", `node ${n.kind}`);
    const t = document.createElementNS(ns, "title");
    t.textContent = n.kind === "feature" ? `L${n.layer} pos ${n.position} f${n.feature} act ${n.activation.toFixed(3)}`
      : `${n.kind} ${n.text !== undefined ? JSON.stringify(n.text) : ""} pos ${n.position}`;
    c.appendChild(t);
    if (n.kind === "feature") c.addEventListener("click", () => showFeature(n.layer, n.feature));
    svg.appendChild(c);
  });
}

function escapeHtml(x) {
  return String(x).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);
}

async function showFeature(layer, index) {  // the feature's card (GET /v1/features/{layer}/{index})
  const box = $("feature-card");
  box.hidden = false;
  box.innerHTML = `<h3>L${layer}:${index}</h3><p class="muted">loading…</p>`;
  const res = await fetch(`/v1/features/${layer}/${index}`, { headers: headers() });
  const c = await res.json();
  if (!res.ok) { box.innerHTML = `<h3>L${layer}:${index}</h3><p>${escapeHtml(c.detail)}</p>`; return; }
  const toks = (xs) => xs.slice(0, 6).map(([t, v]) => `<code>${escapeHtml(JSON.stringify(t))}</code> ${v.toFixed(2)}`).join(", ");
  const ex = c.examples.slice(0, 5).map((e) => {
    const max = Math.max(1e-9, ...e.activations);
    const spans = e.tokens.map((t, j) => `<span class="tok${j === e.highlight ? " hl" : ""}" style="background: rgba(230, 126, 34, ` +
      `${(e.activations[j] / max).toFixed(2)})">${escapeHtml(t.replace(/\n/g, "⏎"))}</span>`).join("");
    return `<div class="example"><span class="act">${e.activation.toFixed(2)}</span> ${spans}</div>`;
  }).join("");
  box.innerHTML = `<h3>L${layer}:${index} — ${escapeHtml(c.description)}</h3>
    <p>fires on ${(100 * c.frequency).toFixed(2)}% of tokens · act max ${c.act_max.toFixed(2)} ·
       ${c.context_independent ? "context-independent" : "context-dependent"} (token identity explains ${(100 * c.eta2).toFixed(0)}%)</p>
    <table>
      <tr><th>WeightLens in</th><td>${toks(c.input_tokens)}</td></tr>
      <tr><th>promotes</th><td>${toks(c.output_tokens)}</td></tr>
      <tr><th>suppresses</th><td>${toks(c.suppressed_tokens)}</td></tr>
      <tr><th>CircuitLens upstream</th><td>${c.upstream.slice(0, 6).map(([s, v]) => `${escapeHtml(s)} ${v.toFixed(2)}`).join(", ")}</td></tr>
      ${c.clusters.map((cl, j) => `<tr><th>pattern ${j + 1}</th><td>${cl.map(([s, v]) => `${escapeHtml(s)} ${v.toFixed(2)}`).join(", ")}</td></tr>`).join("")}
    </table>
    <div class="examples">${ex}</div>`;
}

async function tryIntervention() {
  const i = +$("intervene").dataset.index;
  const body = { task: last.request.task, question: last.request.question, steps: last.request.steps.slice(0, i + 1),
                 step_index: i, features: "auto", mode: "clamp" };
  $("intervene-out").textContent = "regenerating…";
  try {
    const r = await post("/v1/intervene", body);
    const named = r.features.map(([l, f], j) => `L${l}:${f}${r.descriptions[j] ? ` (${r.descriptions[j]})` : ""}`);
    $("intervene-out").textContent = `edited ${named.join("; ")} at position ${r.position}\n` +
      `before: ${r.before}\nafter:  ${r.after}\nstep ${r.step_correct ? "correct" : "still wrong"}; ` +
      `final answer ${r.final_answer} (${r.solved ? "right" : "wrong"})\n\n${r.continuation}`;
  } catch (e) { $("intervene-out").textContent = e.message; }
}

function load(i) {
  const ex = EXAMPLES[i];
  $("task").value = ex.task; $("question").value = ex.question; $("steps").value = ex.steps.join("\n");
}

window.addEventListener("DOMContentLoaded", async () => {
  EXAMPLES.forEach((ex, i) => { const o = document.createElement("option"); o.value = i; o.textContent = ex.name; $("examples").appendChild(o); });
  $("examples").addEventListener("change", (e) => load(+e.target.value));
  load(0);
  $("verify").addEventListener("click", verify);
  $("intervene").addEventListener("click", tryIntervention);
  try {
    const r = await fetch("/v1/model", { headers: headers() });
    if (r.ok) { const m = await r.json(); $("model").textContent = `${m.model} · transcoders ${m.transcoders} · ${m.classifier}`; }
  } catch (e) { /* the page still works without it */ }
});
