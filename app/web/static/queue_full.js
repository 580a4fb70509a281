// Gradio's page client shows its own fixed text ("This application is currently busy") for any
// HTTP 503 from /queue/join and drops the server's; for any other failed status it shows the
// server's `detail`. The server words a full queue as our other busy refusals
// (app/web/limits.py, QueueFullWording): pass that answer to the page's client under 429 so the
// toast says it. Nothing else is touched; what goes over the wire is unchanged.
(() => {
  const original = window.fetch;
  if (typeof original !== "function" || original.wwtQueueFull) return;
  const wrapped = async function (input, init) {
    const response = await original.apply(this, arguments);
    if (response.status !== 503) return response;
    const url = typeof input === "string" ? input : (input && input.url) || String(input);
    if (!/\/queue\/join(\?|$)/.test(url)) return response;
    let body;
    try {
      body = await response.clone().json();
    } catch (e) {
      return response;
    }
    if (!body || body.kind !== "busy" || typeof body.detail !== "string") return response;
    return new Response(JSON.stringify(body), {status: 429, statusText: "Too Many Requests",
                                               headers: {"Content-Type": "application/json"}});
  };
  wrapped.wwtQueueFull = true;
  window.fetch = wrapped;
})();
