// The Write tab's editor. Gradio runs this with `element` (the component), `props`
// (its value: the document), `server` (the Python function suggest) and `watch`.
//
// Tab asks for continuations of the text before the cursor; they show as a short list
// near the cursor; a click, 1-9, or the arrows and Enter insert one; Ctrl+→ inserts only
// its next word and keeps the rest offered; Escape dismisses; Tab again adds fresh ones on
// top of the list (the last HISTORY stay reachable). Every request and every edit bumps
// `counter`, so an answer to an older request is stale and never shown.
//
// The document is kept in this browser's localStorage as it is typed, so a reload or a
// server restart loses nothing; a ?doc= link shows the shared document instead (its edits
// are kept under another key, so the person's own draft is never overwritten).

const ta = element.querySelector(".wwt-text");
const menu = element.querySelector(".wwt-menu");
const statusLine = element.querySelector(".wwt-status");
const errorLine = element.querySelector(".wwt-error");
const linkRow = element.querySelector(".wwt-link");
const linkUrl = element.querySelector(".wwt-link-url");
const MAX_SEND = 65536; // the model sees far less; cut long documents at a boundary that stays put
const PAUSE_MS = 700;   // "suggest as I type" asks after this much quiet
const HISTORY = 9;      // suggestions kept in the list across Tab presses (keys 1-9)
const RECENT = 20;      // answers remembered for typing along with "suggest as I type"
const SHARED = new URLSearchParams(window.location.search).get("doc");
const STORE_KEY = SHARED ? "wwt-shared-document" : "wwt-document";
const savedLine = element.querySelector(".wwt-saved");

let counter = 0;        // the newest request (or edit); answers for older numbers are dropped
// This editor's id: the server cancels its older request when a newer one arrives.
const CLIENT = Math.random().toString(36).slice(2) + Date.now().toString(36);
let shown = null;       // {before, items: [{text, model, ms, older, growing}], note}: the open list, anchored after `before`
let recent = [];        // [{before, items}]: the latest answers, newest last
let selected = 0;
let lastBefore = null;  // the context of the last request: asking again there means fresh samples
let pause = null;       // "suggest as I type" timer
let syncTimer = null;
let synced = props.value || "";
let inserting = false;
let stored = null;      // the text last written to localStorage (null: nothing written yet)
let storeTimer = null;
let restored = null;    // the text restored from this browser, until the person edits it

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
  if (v === "" && restored !== null && ta.value === restored) {
    // The page's own empty first value, arriving after the document was restored from this
    // browser: keep the restored text and give it back to Python.
    synced = null;
    sync();
    return;
  }
  if (v !== synced) { synced = v; ta.value = v; hide(); recent = []; storeSoon(); }
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
                    .map((s) => Object.assign({}, s, {typed: typed}));
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
    meta.textContent = s.model + " · " + Math.round(s.ms) + " ms";
    if (s.older) { li.classList.add("older"); li.title = "from an earlier Tab"; }
    if (s.growing) li.classList.add("growing");
    li.append(key, typed, rest, meta);
    li.addEventListener("mousedown", (e) => { e.preventDefault(); pick(i); });
    menu.appendChild(li);
  });
  if (shown.note) {
    const note = document.createElement("div");
    note.className = "wwt-menu-note";
    note.textContent = shown.note;
    menu.appendChild(note);
  }
  const p = caretPoint();
  const width = ta.parentNode.clientWidth;
  menu.style.top = p.top + "px";
  menu.style.left = Math.max(0, Math.min(p.left, width - 340)) + "px";
  menu.hidden = false;
}

function insert(text) {
  counter++; // whatever was in flight answers an older text now
  cancelStream();
  ta.focus();
  inserting = true;
  // execCommand keeps the browser's undo history; setRangeText is the fallback.
  if (!document.execCommand || !document.execCommand("insertText", false, text)) {
    ta.setRangeText(text, ta.selectionStart, ta.selectionEnd, "end");
  }
  inserting = false;
  sync();
  store();
}

function pick(i) {
  const items = visible();
  if (!items[i]) return;
  const rest = items[i].text.slice(items[i].typed.length);
  hide();
  insert(rest);
  setStatus("inserted a suggestion · Tab for more");
}

function acceptWord() {
  // The next word of the highlighted suggestion (with the spaces before it); the rest stays offered.
  const items = visible();
  const item = items[selected];
  if (!item) return;
  const rest = item.text.slice(item.typed.length);
  const word = (rest.match(/^\s*\S+/) || [rest])[0];
  insert(word);
  const left = visible();
  if (!left.length) { hide(); setStatus("inserted a suggestion · Tab for more"); return; }
  selected = Math.max(0, left.findIndex((s) => s.text === item.text && s.model === item.model));
  render();
}

function fewerNote(got, asked) {
  // Duplicates are dropped (at temperature 0 several rows can write the same words): say so.
  if (!asked || got >= asked) return "";
  return got + " of " + asked + ": the " + (asked - got === 1 ? "other was" : "others were") + " the same";
}

function remember(before, items) {
  recent.push({before: before, items: items});
  if (recent.length > RECENT) recent.shift();
}

function fromRecent() {
  // An earlier answer the person is typing along: shown at once, without asking the model.
  const now = ta.value.slice(0, ta.selectionStart);
  for (let i = recent.length - 1; i >= 0; i--) {
    const r = recent[i];
    if (!now.startsWith(r.before)) continue;
    const typed = now.slice(r.before.length);
    if (r.items.some((s) => s.text.startsWith(typed) && s.text.length > typed.length)) {
      shown = {before: r.before, items: r.items.map((s) => Object.assign({}, s, {older: false})), note: ""};
      selected = 0;
      render();
      return true;
    }
  }
  return false;
}

// -- asking the model ---------------------------------------------------------------------------
// Suggestions are read as they are written from POST wwt/stream (Server-Sent Events, see
// app/web/stream.py): each grows in the list while it is decoded. Hanging up cancels the
// request on the server, so typing on, Esc and asking again all abort the one in flight.
// Where that route does not answer with an event stream, the page asks server.suggest.
const STREAM_URL = new URL("wwt/stream", window.location.origin + window.location.pathname).toString();
let canStream = typeof fetch === "function" && typeof TextDecoder === "function";
let streaming = null;   // the AbortController of the stream being read

function cancelStream() {
  if (streaming) { streaming.abort(); streaming = null; }
}

async function streamSuggest(body, onPartial) {
  // -> the answer, {aborted: true} when cancelled, or null when the route cannot stream here.
  const control = new AbortController();
  streaming = control;
  const gone = () => control.signal.aborted;
  try {
    let response;
    try {
      response = await fetch(STREAM_URL, {method: "POST", headers: {"Content-Type": "application/json"},
                                          body: JSON.stringify(body), signal: control.signal});
    } catch (e) {
      return gone() ? {aborted: true} : null;
    }
    const type = response.headers.get("content-type") || "";
    if (!response.ok || !type.includes("text/event-stream") || !response.body) { canStream = false; return null; }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      let chunk;
      try { chunk = await reader.read(); } catch (e) {
        return gone() ? {aborted: true} : {ok: false, error: "the server stopped answering (" + (e.message || e) + ")"};
      }
      if (chunk.done) break;
      buffer += decoder.decode(chunk.value, {stream: true}).replace(/\r\n/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
        if (!data) continue;
        const event = JSON.parse(data);
        if (event.type === "partial") { if (!gone()) onPartial(event.suggestions || []); }
        else if (event.type === "done" || event.type === "error") {
          // The answer in the one shape the Tab's call answers with too (callbacks.page_answer).
          control.abort();
          return event.answer || {ok: false, error: event.error || "no answer"};
        }
      }
    }
    return gone() ? {aborted: true} : {ok: false, error: "the answer was cut off; try again"};
  } finally {
    if (streaming === control) streaming = null;
  }
}

async function ask(fresh) {
  clearTimeout(pause);
  cancelStream();
  const id = ++counter;
  const caret = ta.selectionStart;
  const before = ta.value.slice(0, caret);
  const s = settings();
  fresh = fresh || before === lastBefore;
  lastBefore = before;
  clearError();
  setStatus("asking " + (s.model || "the model") + "…", true);
  // Tab again while the list is open: the fresh ones go on top, the earlier ones (re-anchored
  // at the cursor, if the person typed along them) stay below, HISTORY in all.
  const earlier = shown ? visible().map((x) => ({text: x.text.slice(x.typed.length), model: x.model, ms: x.ms,
                                                 older: true})) : [];
  const current = () => id === counter && ta.value.slice(0, ta.selectionStart) === before;
  const show = (newest, note, growing) => {
    const keep = earlier.filter((x) => !newest.some((f) => f.text === x.text));
    shown = {before: before, items: newest.concat(keep).slice(0, HISTORY), note: note};
    if (!growing) selected = 0;
    render();
  };
  const body = Object.assign({}, s, {before: stableTail(before), fresh: fresh, client: CLIENT});
  const started = performance.now();
  let r = null;
  if (canStream) {
    r = await streamSuggest(body, (partial) => {
      if (!current()) return;
      const seen = new Set();
      const newest = [];
      for (const x of partial) {
        if (!x.text || seen.has(x.text)) continue;
        seen.add(x.text);
        newest.push({text: x.text, model: s.model || "", ms: performance.now() - started, older: false,
                     growing: !x.finished});
      }
      if (newest.length) { show(newest, "", !!shown); setStatus("writing…", true); }
    });
    if (r && r.aborted) return; // cancelled: typed on, Esc, or asked again
  }
  if (r === null) {
    try {
      r = await server.suggest(body);
    } catch (e) {
      r = {ok: false, error: "the server did not answer (" + (e && e.message ? e.message : e) + ")"};
    }
  }
  if (!current()) return; // stale: never shown
  if (!r || !r.ok) {
    setStatus("");
    hide();
    showError(r && r.error ? r.error : "no answer");
    return;
  }
  setStatus(r.info);
  const newest = r.suggestions.map((x) => ({text: x.text, model: r.model, ms: r.ms, older: false}));
  remember(before, newest);
  show(newest, fewerNote(newest.length, r.asked), false);
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
      cancelStream();
      hide();
      recent = []; // dismissed: typing on does not bring these back
      setStatus("");
    }
    return;
  }
  if (!shown || menu.hidden) return; // closed: every key (Ctrl+→ included) does what it always does
  const n = menu.querySelectorAll(".wwt-item").length;
  if (e.key === "ArrowRight" && (e.ctrlKey || e.altKey) && !e.metaKey && !e.shiftKey) {
    e.preventDefault();
    acceptWord();
  } else if (e.key === "ArrowDown" || e.key === "ArrowUp") {
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
  restored = null;
  syncSoon();
  storeSoon();
  if (inserting) return;
  counter++; // whatever was in flight answers an older text now
  cancelStream();
  if (shown) render(); // typing along a suggestion keeps the rest of it on screen
  if (!shown) {
    setStatus("");
    // Suggest as I type: typing along an earlier answer shows its rest now, else ask after a pause.
    if (!(settings().auto && fromRecent())) scheduleAuto();
  }
});

ta.addEventListener("blur", () => { sync(); setTimeout(() => { if (document.activeElement !== ta) hide(); }, 150); });
ta.addEventListener("click", () => { if (shown && typedSince() === null) hide(); });

// -- buttons: suggest (for touch screens), share ---------------------------------------------
const suggestButton = element.querySelector(".wwt-suggest");
suggestButton.addEventListener("mousedown", (e) => e.preventDefault()); // keep the cursor where it is
suggestButton.addEventListener("click", () => { ta.focus(); ask(!!shown); });

// Sharing uses the documented HTTP API (app/web/shared_docs.py). The link reads the document; the
// delete key comes back once, to its author, and is kept in this browser only: a link opened
// anywhere else can read the document but not delete it.
const DOC_URL = new URL("wwt/doc", window.location.origin + window.location.pathname).toString();
const KEYS_STORE = "wwt-delete-keys";
const MAX_KEYS = 100;  // the newest delete keys kept in this browser

function deleteKeys() {
  try { return JSON.parse(localStorage.getItem(KEYS_STORE) || "{}") || {}; } catch (e) { return {}; }
}
function keepDeleteKey(id, key) {
  const keys = deleteKeys();
  delete keys[id];
  keys[id] = key;
  const ids = Object.keys(keys);
  for (const old of ids.slice(0, Math.max(0, ids.length - MAX_KEYS))) delete keys[old];
  try { localStorage.setItem(KEYS_STORE, JSON.stringify(keys)); return true; } catch (e) { return false; }
}
function forgetDeleteKey(id) {
  const keys = deleteKeys();
  delete keys[id];
  try { localStorage.setItem(KEYS_STORE, JSON.stringify(keys)); } catch (e) { /* nothing kept */ }
}
async function docCall(method, url, body, key) {
  const headers = {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (key) headers["Authorization"] = "Bearer " + key;
  try {
    const response = await fetch(url, {method: method, headers: headers,
                                       body: body === undefined ? undefined : JSON.stringify(body)});
    return await response.json();
  } catch (e) {
    return {ok: false, error: "the server did not answer"};
  }
}

let linkDoc = SHARED;   // the document the link row shows: the one just shared, or the ?doc= one open
function showLink(id, url) {
  linkUrl.value = url;
  linkDoc = id;
  linkRow.hidden = false;
  // Only the author's browser holds the key: elsewhere the link reads, and nothing offers to delete.
  element.querySelector(".wwt-unshare").hidden = !deleteKeys()[id];
}

element.querySelector(".wwt-share").addEventListener("click", async () => {
  sync();
  clearError();
  setStatus("saving…", true);
  const r = await docCall("POST", DOC_URL, {text: ta.value});
  setStatus("");
  if (!r || !r.ok) { showError(r && r.error ? r.error : "could not save"); return; }
  const kept = keepDeleteKey(r.id, r.delete_key);
  const url = new URL(window.location.href);
  url.search = "?doc=" + encodeURIComponent(r.id);
  url.hash = "";
  showLink(r.id, url.toString());
  setStatus(kept ? "saved · anyone with the link can open it; only this browser can delete it"
                 : "saved · anyone with the link can open it (this browser could not keep the key to delete it)");
});

if (SHARED) showLink(SHARED, window.location.href);
element.querySelector(".wwt-unshare").addEventListener("click", async () => {
  const key = linkDoc && deleteKeys()[linkDoc];
  if (!key) return;
  clearError();
  const r = await docCall("DELETE", DOC_URL + "/" + encodeURIComponent(linkDoc), undefined, key);
  if (!r || !r.ok) { showError(r && r.error ? r.error : "could not delete"); return; }
  forgetDeleteKey(linkDoc);
  linkDoc = null;
  linkRow.hidden = true;
  setStatus("shared copy deleted · the link no longer opens it");
});

element.querySelector(".wwt-copy").addEventListener("click", async () => {
  linkUrl.select();
  try { await navigator.clipboard.writeText(linkUrl.value); setStatus("link copied"); }
  catch (e) { document.execCommand && document.execCommand("copy"); setStatus("link copied"); }
});

// -- never lose a document: kept in this browser as it is typed --------------------------------
function savedNote(ok) {
  if (!savedLine) return;
  savedLine.textContent = ok ? "saved in this browser" : "not saved in this browser (storage is full or off)";
  savedLine.classList.toggle("unsaved", !ok);
}
function store() {
  clearTimeout(storeTimer);
  const text = ta.value;
  if (text === stored) return true;
  try {
    localStorage.setItem(STORE_KEY, text);
    stored = text;
    savedNote(true);
    return true;
  } catch (e) {
    savedNote(false);
    return false;
  }
}
function storeSoon() { clearTimeout(storeTimer); storeTimer = setTimeout(store, 250); }
function unsaved() {
  // The page would lose work when the text on screen is not what the browser holds: an edit
  // that could not be stored, or storage cleared since (checked against what is really there).
  let held = null;
  try { held = localStorage.getItem(STORE_KEY); } catch (e) { held = null; }
  return ta.value !== "" && held !== ta.value;
}

if (!SHARED && !ta.value) {
  let saved = null;
  try { saved = localStorage.getItem(STORE_KEY); } catch (e) { saved = null; }
  if (saved) {
    ta.value = saved;
    stored = saved;
    restored = saved;
    sync(); // Python's copy too, for the token view and sharing
    setStatus("your document, as this browser kept it");
    savedNote(true);
  }
}

window.addEventListener("beforeunload", (e) => {
  stored = null; // write it now, whatever was written before (storage may have been cleared)
  store();
  if (unsaved()) {
    e.preventDefault();
    e.returnValue = "This document is not saved in this browser; leave anyway?";
    return e.returnValue;
  }
});
window.addEventListener("pagehide", () => { store(); });
