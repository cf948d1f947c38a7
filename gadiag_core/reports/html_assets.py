"""The HTML report's static parts: its style sheet and the question pages'
script (hover and pin a token for its details, pick the colouring row). Inline
in every page: the report folder opens offline.
"""

CSS = """
:root { --fg:#1d1d1f; --dim:#6e6e73; --line:#d2d2d7; --bg:#ffffff; --panel:#f5f5f7; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       color: var(--fg); background: var(--bg); margin: 0 auto; padding: 18px 28px 60px; max-width: 1400px; }
h1 { font-size: 22px; margin: 6px 0 4px; } h2 { font-size: 16px; margin: 26px 0 8px; }
a { color: #0a58ca; text-decoration: none; } a:hover { text-decoration: underline; }
.sub, .dim { color: var(--dim); }
nav { font-size: 13px; color: var(--dim); margin-bottom: 8px; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { padding: 3px 9px; border-bottom: 1px solid var(--line); text-align: right; white-space: nowrap; }
th { font-weight: 600; background: var(--panel); position: sticky; top: 0; }
td.l, th.l { text-align: left; }
tbody.ref td { color: var(--dim); }
tbody.ref tr:first-child td { border-top: 2px solid var(--line); }
.banner { background: #fff3cd; border: 1px solid #e0c36a; padding: 6px 10px; border-radius: 6px; margin: 10px 0; }
figure { display: inline-block; margin: 8px 18px 8px 0; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid var(--line); border-radius: 6px; }
figcaption { color: var(--dim); font-size: 12px; }
.chip { display: inline-block; padding: 0 6px; margin: 1px 2px; border-radius: 4px; border: 1px solid var(--line); }
.controls { position: sticky; top: 0; background: var(--bg); padding: 8px 0; border-bottom: 1px solid var(--line); z-index: 5; }
.legend span { display: inline-block; width: 34px; text-align: center; font-size: 11px; }
.text { font: 14px/1.9 ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; white-space: pre-wrap;
        word-break: break-word; background: var(--panel); padding: 10px 12px; border-radius: 6px; }
.tok.s { border-bottom: 2px solid #555; cursor: pointer; border-radius: 2px; }
.tok.s.nan { border-bottom: 2px dotted #999; }
.tok.s:hover, .cell:hover, .tok.s.pinned { outline: 2px solid #0a58ca; }
.matrix td.cell { cursor: pointer; min-width: 52px; }
.matrix th.tokh { font: 12px ui-monospace, "DejaVu Sans Mono", monospace; }
.matrix tr.sel td { font-weight: 700; }
#tip { position: fixed; z-index: 20; max-width: 460px; background: #fff; border: 1px solid #999; border-radius: 8px;
       box-shadow: 0 6px 24px rgba(0,0,0,.18); padding: 10px 12px; font-size: 13px; pointer-events: none;
       max-height: calc(100vh - 8px); overflow: auto; }
#tip.pinned { pointer-events: auto; border-color: #0a58ca; }
#tip table { margin: 4px 0 8px; } #tip td, #tip th { padding: 1px 6px; }
#tip .big { font-size: 18px; font-weight: 700; padding: 0 6px; border-radius: 4px; }
#tip code { background: var(--panel); padding: 0 3px; border-radius: 3px; white-space: pre; }
.strip { display: flex; gap: 1px; margin: 6px 0 2px; flex-wrap: wrap; }
.strip span { width: 18px; height: 14px; border-radius: 2px; font-size: 9px; text-align: center; color: #fff; }
.swatch { display: inline-block; width: 12px; height: 12px; border-radius: 2px; vertical-align: -1px; margin: 0 3px 0 8px; }
#tip h4 { margin: 6px 0 2px; font-size: 12px; color: var(--dim); text-transform: uppercase; letter-spacing: .04em; }
"""


SCRIPT = r"""
(function () {
  "use strict";
  const DATA = JSON.parse(document.getElementById("data").textContent);
  const select = document.getElementById("row");
  const tip = document.getElementById("tip");
  let pinned = null;
  let hovered = null;

  function colour(v) {
    if (typeof v !== "number" || !isFinite(v)) return "transparent";
    v = Math.max(-1, Math.min(1, v));
    const rgb = v >= 0 ? "26,152,80" : "215,48,39";
    return "rgba(" + rgb + "," + (0.08 + 0.72 * Math.abs(v)).toFixed(3) + ")";
  }
  function num(v, digits) {
    if (typeof v !== "number" || !isFinite(v)) return "–";
    const s = v.toFixed(digits === undefined ? 3 : digits);
    return v >= 0 ? "+" + s : s;
  }
  function plain(v, digits) {
    return (typeof v === "number" && isFinite(v)) ? v.toFixed(digits === undefined ? 3 : digits) : "–";
  }
  function esc(s) {
    return String(s).replace(/[&<>"']/g, function (c) {
      return {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c];
    });
  }
  function shown(token) {
    // quotes, backslashes and control characters escaped; a space made visible
    return esc(JSON.stringify(String(token)).slice(1, -1).replace(/ /g, "\u2423"));
  }
  function nodeOf(el) {
    const r = DATA.rollouts[el.dataset.r];
    return r ? r.nodes[el.dataset.n] : undefined;
  }

  function recolour() {
    const row = select.value;
    document.querySelectorAll(".tok.s").forEach(function (el) {
      const node = nodeOf(el);
      const v = node ? node.cos[row] : undefined;
      el.style.background = colour(v);
      el.classList.toggle("nan", !(typeof v === "number" && isFinite(v)));
    });
    document.querySelectorAll(".qcos").forEach(function (el) {
      const v = DATA.rollouts[el.dataset.r].qcos[row];
      el.style.background = colour(v);
      el.textContent = num(v);
    });
    document.querySelectorAll(".matrix tr[data-row]").forEach(function (tr) {
      tr.classList.toggle("sel", tr.dataset.row === row);
    });
    const params = new URLSearchParams(window.location.search);
    params.set("row", row);
    try { history.replaceState(null, "", "?" + params.toString() + window.location.hash); } catch (e) { /* file: URLs may refuse */ }
    document.querySelectorAll("a.keep-row").forEach(function (a) {
      const base = a.getAttribute("href").split("?")[0].split("#")[0];
      const hash = a.getAttribute("href").indexOf("#") >= 0 ? a.getAttribute("href").slice(a.getAttribute("href").indexOf("#")) : "";
      a.setAttribute("href", base + "?row=" + encodeURIComponent(row) + hash);
    });
  }

  function details(el) {
    const node = nodeOf(el);
    const row = select.value;
    const teacher = row.split("/")[0];
    const v = node.cos[row];
    let h = "<div><code>" + shown(node.token) + "</code> at position " + esc(el.dataset.n) +
      " of rollout " + esc(el.dataset.r) + "</div>";
    h += "<div style='margin:4px 0'>" + esc(row) + " <span class='big' style='background:" + colour(v) + "'>" +
      num(v) + "</span></div>";
    h += "<div>π(token) " + plain(node.pi) + " · π max " + plain(node.pi_max) + " · V̂ " + plain(node.value) +
      " · covered mass " + plain(node.mass, 2) + "</div>";
    h += "<h4>ideal's candidates</h4><table><tr><th class='l'>token</th><th>π</th><th>Q̂</th><th>n</th><th>a*</th></tr>";
    node.cands.forEach(function (c) {
      const mine = c[0] === node.token ? " style='font-weight:700'" : "";
      h += "<tr" + mine + "><td class='l'><code>" + shown(c[0]) + "</code></td><td>" + plain(c[1]) + "</td><td>" +
        plain(c[2]) + "</td><td>" + (c[3] === null || c[3] === undefined ? "–" : esc(c[3])) + "</td><td>" + num(c[4]) + "</td></tr>";
    });
    h += "</table>";
    const teachers = Object.keys(node.top || {});
    if (teachers.length) {
      h += "<h4>teachers' top tokens</h4><table>";
      teachers.sort(function (a, b) { return (b === teacher) - (a === teacher); }).forEach(function (t) {
        const cells = node.top[t].map(function (p) {
          return "<code>" + shown(p[0]) + "</code> " + plain(p[1], 2);
        }).join(" &nbsp; ");
        h += "<tr" + (t === teacher ? " style='font-weight:700'" : "") + "><td class='l'>" + esc(t) +
          "</td><td class='l'>" + cells + "</td></tr>";
      });
      h += "</table>";
    } else {
      h += "<h4>teachers' top tokens</h4><div class='dim'>not recorded in this run</div>";
    }
    h += "<h4>every row</h4><div>";
    DATA.rows.forEach(function (name) {
      h += "<span class='chip' style='background:" + colour(node.cos[name]) + (name === row ? ";font-weight:700" : "") +
        "'>" + esc(name) + " " + num(node.cos[name], 2) + "</span>";
    });
    h += "</div>";
    if (pinned) h += "<div class='dim' style='margin-top:6px'>pinned: Esc or click elsewhere to close</div>";
    return h;
  }

  function place(x, y) {
    const pad = 14, w = tip.offsetWidth, hgt = tip.offsetHeight;
    let left = x + pad, top = y + pad;
    if (left + w > window.innerWidth - 4) left = Math.max(4, x - w - pad);
    if (top + hgt > window.innerHeight - 4) top = Math.max(4, y - hgt - pad);
    tip.style.left = left + "px";
    tip.style.top = top + "px";
  }
  function show(el, x, y) {
    if (!nodeOf(el)) return;
    hovered = el;
    tip.innerHTML = details(el);
    tip.hidden = false;
    place(x, y);
  }
  function unpin() {
    if (pinned) pinned.classList.remove("pinned");
    pinned = null;
    tip.classList.remove("pinned");
    tip.hidden = true;
  }
  function pin(el) {
    unpin();
    pinned = el;
    el.classList.add("pinned");
    tip.classList.add("pinned");
    const box = el.getBoundingClientRect();
    show(el, box.left, box.bottom);
  }

  document.addEventListener("mouseover", function (e) {
    const el = e.target.closest(".tok.s, .cell");
    if (el && !pinned) show(el, e.clientX, e.clientY);
  });
  document.addEventListener("mousemove", function (e) {
    if (!pinned && !tip.hidden && e.target.closest(".tok.s, .cell")) place(e.clientX, e.clientY);
  });
  document.addEventListener("mouseout", function (e) {
    if (!pinned && e.target.closest(".tok.s, .cell")) tip.hidden = true;
  });
  document.addEventListener("click", function (e) {
    const el = e.target.closest(".tok.s, .cell");
    if (el) {
      const target = document.getElementById("r" + el.dataset.r + "-n" + el.dataset.n) || el;
      pin(target);
      try { history.replaceState(null, "", window.location.search + "#r" + el.dataset.r + "-n" + el.dataset.n); } catch (err) { /* ignore */ }
    } else if (!e.target.closest("#tip")) {
      unpin();
    }
  });
  document.addEventListener("keydown", function (e) { if (e.key === "Escape") unpin(); });
  select.addEventListener("change", function () {
    recolour();
    if (pinned) pin(pinned);
    else if (hovered && !tip.hidden) tip.innerHTML = details(hovered);
  });

  const wanted = new URLSearchParams(window.location.search).get("row");
  if (wanted && DATA.rows.indexOf(wanted) >= 0) select.value = wanted;
  recolour();
  const m = /^#r(\d+)-n(\d+)$/.exec(window.location.hash);
  if (m) {
    const el = document.getElementById("r" + m[1] + "-n" + m[2]);
    if (el) { el.scrollIntoView({block: "center"}); pin(el); }
  }
})();
"""
