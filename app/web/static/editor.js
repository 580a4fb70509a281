// The Write tab's editor. Gradio runs this with `element` (the component), `props`
// (its value: the document), `server` (Python functions: suggest, share) and `watch`.
//
// Tab asks for continuations of the text before the cursor; they show as a short list
// near the cursor; a click, 1-9, or the arrows and Enter insert one; Escape dismisses;
// Tab again asks for fresh ones. Every request and every edit bumps `counter`, so an
// answer to an older request is stale and never shown.

const ta = element.querySelector(".wwt-text");
const menu = element.querySelector(".wwt-menu");
const statusLine = element.querySelector(".wwt-status");
const errorLine = element.querySelector(".wwt-error");
const linkRow = element.querySelector(".wwt-link");
const linkUrl = element.querySelector(".wwt-link-url");
const MAX_SEND = 65536; // the model sees far less; cut long documents at a boundary that stays put
const PAUSE_MS = 700;   // "suggest as I type" asks after this much quiet

let counter = 0;        // the newest request (or edit); answers for older numbers are dropped
// This editor's id: the server cancels its older request when a newer one arrives.
const CLIENT = Math.random().toString(36).slice(2) + Date.now().toString(36);
let shown = null;       // {before, items, model, ms}: suggestions on screen, anchored after `before`
let selected = 0;
let lastBefore = null;  // the context of the last request: asking again there means fresh samples
let pause = null;       // "suggest as I type" timer
let syncTimer = null;
let synced = props.value || "";
let inserting = false;

ta.value = props.value || "";

function settings() {
  // Defaults from Python, overridden by the settings panel (see ui.py: window.wwtSettings).
  return Object.assign({}, props.settings || {}, window.wwtSettings || {});
}

function stableTail(text) {
  if (text.length <= MAX_SEND) return text;
  const step = MAX_SEND / 2;
  return text.slice(Math.floor((text.length - MAX_SEND) / step + 1) * step);
}

// -- keeping Python's copy of the document current (for the token view and sharing) --------
function sync() {
  clearTimeout(syncTimer);
  if (ta.value !== synced) { synced = ta.value; props.value = synced; }
}
function syncSoon() { clearTimeout(syncTimer); syncTimer = setTimeout(sync, 300); }
watch("value", () => {
  const v = props.value || "";
  if (v !== synced) { synced = v; ta.value = v; hide(); }
});

// -- messages -------------------------------------------------------------------------------
function setStatus(text, busy) {
  statusLine.textContent = text || "";
  statusLine.classList.toggle("busy", !!busy);
}
function showError(message) {
  errorLine.textContent = "⚠ " + message;
  errorLine.hidden = false;
}
function clearError() { errorLine.hidden = true; errorLine.textContent = ""; }

// -- where the cursor is on screen: a hidden copy of the textarea up to the cursor ----------
function caretPoint() {
  const cs = getComputedStyle(ta);
  const mirror = document.createElement("div");
  for (const p of ["boxSizing", "width", "fontFamily", "fontSize", "fontWeight", "lineHeight", "letterSpacing",
                   "paddingTop", "paddingRight", "paddingBottom", "paddingLeft", "borderTopWidth",
                   "borderRightWidth", "borderBottomWidth", "borderLeftWidth", "tabSize", "wordSpacing"]) {
    mirror.style[p] = cs[p];
  }
  Object.assign(mirror.style, {position: "absolute", visibility: "hidden", top: "0", left: "0",
                               whiteSpace: "pre-wrap", overflowWrap: "break-word", overflow: "hidden"});
  mirror.textContent = ta.value.slice(0, ta.selectionStart);
  const mark = document.createElement("span");
  mark.textContent = "\u200b";
  mirror.appendChild(mark);
  ta.parentNode.appendChild(mirror);
  const lineHeight = parseFloat(cs.lineHeight) || parseFloat(cs.fontSize) * 1.4;
  const point = {top: mark.offsetTop - ta.scrollTop + lineHeight + 4, left: mark.offsetLeft - ta.scrollLeft};
  mirror.remove();
  return point;
}

// -- the suggestion list ----------------------------------------------------------------------
function typedSince() {
  // What the person typed after the suggestions appeared, or null if they went elsewhere.
  const now = ta.value.slice(0, ta.selectionStart);
  return shown && now.startsWith(shown.before) && ta.selectionStart === ta.selectionEnd
    ? now.slice(shown.before.length) : null;
}

function visible() {
  const typed = typedSince();
  if (typed === null) return [];
  return shown.items.filter((s) => s.text.startsWith(typed) && s.text.length > typed.length)
                    .map((s) => ({text: s.text, typed: typed}));
}

function hide() {
  shown = null;
  menu.hidden = true;
  menu.replaceChildren();
}

function render() {
  const items = visible();
  if (!items.length) { hide(); return; }
  selected = Math.min(selected, items.length - 1);
  menu.replaceChildren();
  items.forEach((s, i) => {
    const li = document.createElement("div");
    li.className = "wwt-item" + (i === selected ? " selected" : "");
    li.setAttribute("role", "option");
    li.setAttribute("aria-selected", i === selected ? "true" : "false");
    const key = document.createElement("kbd");
    key.textContent = String(i + 1);
    const typed = document.createElement("span");
    typed.className = "wwt-typed";
    typed.textContent = s.typed;
    const rest = document.createElement("span");
    rest.className = "wwt-rest";
    rest.textContent = s.text.slice(s.typed.length).replace(/\n/g, "↵");
    const meta = document.createElement("span");
    meta.className = "wwt-meta";
    meta.textContent = shown.model + " · " + Math.round(shown.ms) + " ms";
    li.append(key, typed, rest, meta);
    li.addEventListener("mousedown", (e) => { e.preventDefault(); pick(i); });
    menu.appendChild(li);
  });
  const p = caretPoint();
  const width = ta.parentNode.clientWidth;
  menu.style.top = p.top + "px";
  menu.style.left = Math.max(0, Math.min(p.left, width - 340)) + "px";
  menu.hidden = false;
}

function pick(i) {
  const items = visible();
  if (!items[i]) return;
  const rest = items[i].text.slice(items[i].typed.length);
  hide();
  counter++;
  ta.focus();
  inserting = true;
  // execCommand keeps the browser's undo history; setRangeText is the fallback.
  if (!document.execCommand || !document.execCommand("insertText", false, rest)) {
    ta.setRangeText(rest, ta.selectionStart, ta.selectionEnd, "end");
  }
  inserting = false;
  sync();
  setStatus("inserted a suggestion · Tab for more");
}

// -- asking the model ---------------------------------------------------------------------------
async function ask(fresh) {
  clearTimeout(pause);
  const id = ++counter;
  const caret = ta.selectionStart;
  const before = ta.value.slice(0, caret);
  const s = settings();
  fresh = fresh || before === lastBefore;
  lastBefore = before;
  clearError();
  setStatus("asking " + (s.model || "the model") + "…", true);
  let r;
  try {
    r = await server.suggest(Object.assign({}, s, {before: stableTail(before), fresh: fresh, client: CLIENT}));
  } catch (e) {
    r = {ok: false, error: "the server did not answer (" + (e && e.message ? e.message : e) + ")"};
  }
  if (id !== counter || ta.value.slice(0, ta.selectionStart) !== before) return; // stale: never shown
  if (!r || !r.ok) {
    setStatus("");
    hide();
    showError(r && r.error ? r.error : "no answer");
    return;
  }
  setStatus(r.info);
  shown = {before: before, items: r.suggestions, model: r.model, ms: r.ms};
  selected = 0;
  render();
}

function scheduleAuto() {
  clearTimeout(pause);
  const s = settings();
  if (!s.auto) return;
  pause = setTimeout(() => { if (document.activeElement === ta && !shown) ask(false); }, PAUSE_MS);
}

// -- keys ---------------------------------------------------------------------------------------
ta.addEventListener("keydown", (e) => {
  if (e.isComposing) return;
  const plain = !e.ctrlKey && !e.altKey && !e.metaKey;
  if (e.key === "Tab" && plain && !e.shiftKey) {
    e.preventDefault();
    ask(!!shown);
    return;
  }
  if (e.key === "Escape") {
    if (shown || statusLine.classList.contains("busy")) {
      e.preventDefault();
      counter++;
      hide();
      setStatus("");
    }
    return;
  }
  if (!shown || menu.hidden) return;
  const n = menu.children.length;
  if (e.key === "ArrowDown" || e.key === "ArrowUp") {
    e.preventDefault();
    selected = (selected + (e.key === "ArrowDown" ? 1 : n - 1)) % n;
    render();
  } else if (e.key === "Enter" && plain) {
    e.preventDefault();
    pick(selected);
  } else if (plain && !e.shiftKey && /^[1-9]$/.test(e.key) && Number(e.key) <= n) {
    e.preventDefault();
    pick(Number(e.key) - 1);
  }
});

ta.addEventListener("input", () => {
  syncSoon();
  if (inserting) return;
  counter++; // whatever was in flight answers an older text now
  if (shown) render(); // typing along a suggestion keeps the rest of it on screen
  if (!shown) { setStatus(""); scheduleAuto(); }
});

ta.addEventListener("blur", () => { sync(); setTimeout(() => { if (document.activeElement !== ta) hide(); }, 150); });
ta.addEventListener("click", () => { if (shown && typedSince() === null) hide(); });

// -- buttons: suggest (for touch screens), share ---------------------------------------------
const suggestButton = element.querySelector(".wwt-suggest");
suggestButton.addEventListener("mousedown", (e) => e.preventDefault()); // keep the cursor where it is
suggestButton.addEventListener("click", () => { ta.focus(); ask(!!shown); });

element.querySelector(".wwt-share").addEventListener("click", async () => {
  sync();
  clearError();
  setStatus("saving…", true);
  let r;
  try { r = await server.share({text: ta.value}); } catch (e) { r = {ok: false, error: "the server did not answer"}; }
  setStatus("");
  if (!r || !r.ok) { showError(r && r.error ? r.error : "could not save"); return; }
  const url = new URL(window.location.href);
  url.search = "?doc=" + encodeURIComponent(r.id);
  url.hash = "";
  linkUrl.value = url.toString();
  linkRow.hidden = false;
  setStatus("saved · anyone with the link can open this document");
});

element.querySelector(".wwt-copy").addEventListener("click", async () => {
  linkUrl.select();
  try { await navigator.clipboard.writeText(linkUrl.value); setStatus("link copied"); }
  catch (e) { document.execCommand && document.execCommand("copy"); setStatus("link copied"); }
});
