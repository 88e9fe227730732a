// stampflow console: the little script there is (served from /static, as the CSP asks).
// 1. Live updates: a workflows table with data-live-url polls for rows created since the
//    newest one it shows and puts them on top (server-rendered, escaped HTML rows).
// 2. Replay: the confirm page's form asks once more before it posts.
"use strict";

function pollWorkflows(table) {
  const base = table.dataset.liveUrl;
  const body = table.tBodies[0];
  async function tick() {
    const newest = table.dataset.newest;
    if (!newest) {
      // An empty table: the page itself is the cheapest way to find the first rows.
      const response = await fetch(window.location.href, { credentials: "same-origin" });
      if (response.ok) {
        const doc = new DOMParser().parseFromString(await response.text(), "text/html");
        const fresh = doc.getElementById("workflows");
        if (fresh && fresh.dataset.newest) {
          body.replaceChildren(...fresh.tBodies[0].children);
          table.dataset.newest = fresh.dataset.newest;
        }
      }
      return;
    }
    const sep = base.includes("?") && !base.endsWith("?") ? "&" : "";
    const url = base + sep + "newer_than=" + encodeURIComponent(newest);
    const response = await fetch(url, { credentials: "same-origin" });
    if (!response.ok) return;
    const html = (await response.text()).trim();
    if (html) {
      const template = document.createElement("template");
      template.innerHTML = html;
      for (const row of template.content.querySelectorAll("tr")) row.classList.add("new");
      body.prepend(template.content);
    }
    table.dataset.newest = response.headers.get("X-Newest-Cursor") || newest;
  }
  async function loop() {
    try { await tick(); } catch (e) { /* the next tick tries again */ }
    window.setTimeout(loop, 2000);
  }
  window.setTimeout(loop, 2000);
}

document.addEventListener("DOMContentLoaded", () => {
  const table = document.querySelector("table[data-live-url]");
  if (table) pollWorkflows(table);
  const form = document.getElementById("replay-form");
  if (form) {
    form.addEventListener("submit", (event) => {
      const to = form.elements.namedItem("to").value;
      if (!window.confirm("Replay this dead letter to " + to + "? It is sent once and cannot be undone.")) {
        event.preventDefault();
      }
    });
  }
});
