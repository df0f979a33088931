// The chat page: talks to this server's public OpenAI endpoints only (/health, /v1/models, /v1/chat/completions
// streamed as SSE). Conversations, settings, theme and the API key live in this browser's localStorage.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const el = MD.el;  // markdown.js's: text only ever through textContent
  const PREFIX = "mlc_llm.";
  const store = {
    get(key, fallback) {
      try {
        const v = localStorage.getItem(PREFIX + key);
        return v === null ? fallback : JSON.parse(v);
      } catch (e) {
        return fallback;
      }
    },
    set(key, value) {
      try {
        localStorage.setItem(PREFIX + key, JSON.stringify(value));
      } catch (e) {
        showBanner("This browser did not let the page save the conversation: " + e.message, true);
      }
    },
  };

  // Conversations as saved by an earlier visit, keeping only well-formed ones (the storage may hold anything).
  function savedChats() {
    const raw = store.get("chats", {});
    const out = {};
    if (!raw || typeof raw !== "object") return out;
    for (const [id, c] of Object.entries(raw)) {
      if (!c || typeof c !== "object" || !Array.isArray(c.messages)) continue;
      const messages = c.messages.filter((m) => m && (m.role === "user" || m.role === "assistant") &&
                                          typeof m.content === "string");
      out[id] = { ...c, id, title: String(c.title || "Chat"), updated: Number(c.updated) || 0, messages };
    }
    return out;
  }

  const state = {
    model: null,          // the served model's id, once /v1/models answered
    contextSize: null,
    apiKey: String(store.get("apiKey", "") || ""),
    chats: savedChats(),
    current: store.get("current", null),
    controller: null,     // AbortController of the request in flight
    retry: null,
  };

  // ---- settings --------------------------------------------------------------------------------------------------
  const FIELDS = { system: "system", temperature: "temperature", top_p: "top-p", max_tokens: "max-tokens",
                   seed: "seed", mode: "output-mode", schema: "schema", tools: "tools", tool_choice: "tool-choice" };

  function loadSettings() {
    const saved = store.get("settings", {});
    for (const [key, id] of Object.entries(FIELDS)) if (saved[key] !== undefined) $(id).value = saved[key];
    showOutputBox();
  }

  function saveSettings() {
    const out = {};
    for (const [key, id] of Object.entries(FIELDS)) out[key] = $(id).value;
    store.set("settings", out);
  }

  function showOutputBox() {
    const mode = $("output-mode").value;
    $("schema").hidden = mode !== "json_schema";
    $("tools").hidden = mode !== "tools";
    $("tool-choice-row").hidden = mode !== "tools";
  }

  function number(id, integer) {
    const raw = $(id).value.trim();
    if (!raw) return undefined;
    const v = Number(raw);
    if (!Number.isFinite(v) || (integer && !Number.isInteger(v))) throw new Error(`${id}: '${raw}' is not a number`);
    return v;
  }

  // The request fields the settings add; throws with a message a person can act on.
  function samplingFields() {
    const body = {};
    const t = number("temperature"), p = number("top-p"), m = number("max-tokens", true), s = number("seed", true);
    if (t !== undefined) body.temperature = t;
    if (p !== undefined) body.top_p = p;
    if (m !== undefined) body.max_tokens = m;
    if (s !== undefined) body.seed = s;
    const mode = $("output-mode").value;
    const parse = (id, what) => {
      try {
        return JSON.parse($(id).value);
      } catch (e) {
        throw new Error(`${what} is not valid JSON: ${e.message}`);
      }
    };
    if (mode === "json_object") body.response_format = { type: "json_object" };
    if (mode === "json_schema") {
      const schema = parse("schema", "The JSON schema");
      body.response_format = { type: "json_schema", json_schema: { name: "answer", schema, strict: true } };
    }
    if (mode === "tools") {
      const tools = parse("tools", "The tools list");
      body.tools = Array.isArray(tools) ? tools : [tools];
      body.tool_choice = $("tool-choice").value;
    }
    return body;
  }

  function checkSettings() {
    try {
      samplingFields();
      $("settings-error").hidden = true;
      return true;
    } catch (e) {
      $("settings-error").textContent = e.message;
      $("settings-error").hidden = false;
      return false;
    }
  }

  // ---- conversations ---------------------------------------------------------------------------------------------
  function currentChat() {
    return Object.hasOwn(state.chats, state.current) ? state.chats[state.current] : null;
  }

  function newChat() {
    const id = Date.now().toString(36) + Math.random().toString(36).slice(2, 6);
    state.chats[id] = { id, title: "New chat", updated: Date.now(), messages: [] };
    state.current = id;
    saveChats();
    return state.chats[id];
  }

  function saveChats() {
    store.set("chats", state.chats);
    store.set("current", state.current);
  }

  function renderChatList() {
    const list = $("chats");
    list.replaceChildren();
    const chats = Object.values(state.chats).sort((a, b) => b.updated - a.updated);
    for (const chat of chats) {
      const li = el("li", chat.id === state.current ? "active" : "");
      li.appendChild(el("span", "title", chat.title));
      const del = el("button", "delete", "\u00d7");
      del.type = "button";
      del.title = "Delete this conversation";
      del.addEventListener("click", (ev) => {
        ev.stopPropagation();
        if (!confirm(`Delete "${chat.title}"?`)) return;
        if (chat.id === state.current) stop();
        delete state.chats[chat.id];
        if (chat.id === state.current) state.current = null;
        saveChats();
        render();
      });
      li.appendChild(del);
      li.addEventListener("click", () => {
        if (state.controller) return;  // finish or stop the answer in flight first
        state.current = chat.id;
        saveChats();
        render();
      });
      list.appendChild(li);
    }
  }

  // ---- rendering -------------------------------------------------------------------------------------------------
  function statsText(st, brief) {
    if (!st) return "";
    const parts = [];
    if (st.ttft != null) {
      parts.push(`TTFT ${st.ttft < 1 ? Math.round(st.ttft * 1000) + " ms" : st.ttft.toFixed(2) + " s"}`);
    }
    if (st.tps != null) parts.push(`${st.tps.toFixed(1)} tok/s`);
    if (st.prompt != null && !brief) parts.push(`${st.prompt} prompt + ${st.completion} generated tokens`);
    return parts.join(" \u00b7 ");
  }

  function messageElement(msg, index, chat) {
    const last = index === chat.messages.length - 1;
    const lastUser = chat.messages.map((m) => m.role).lastIndexOf("user") === index;
    const div = el("div", `msg ${msg.role}`);
    div.appendChild(el("div", "role", msg.role === "user" ? "You" : state.model || "Assistant"));
    const body = el("div", "body");
    if (msg.role === "assistant") renderMarkdown(msg.content, body);
    else body.textContent = msg.content;
    div.appendChild(body);
    for (const call of msg.toolCalls || []) {
      const box = el("div", "tool-call");
      box.append(el("div", "name", `tool call: ${call.name}`), el("pre", null, call.arguments));
      div.appendChild(box);
    }
    if (msg.error) div.appendChild(el("div", "error", msg.error));
    const meta = el("div", "meta");
    const notes = [msg.stopped && "stopped", msg.truncated && "max tokens reached", statsText(msg.stats)];
    meta.appendChild(el("span", "msg-stats", notes.filter(Boolean).join(" \u00b7 ")));
    if (!state.controller && last && msg.role === "assistant") {
      meta.appendChild(button("Regenerate", "regenerate", regenerate));
    }
    if (!state.controller && lastUser) meta.appendChild(button("Edit", "edit", () => editFrom(index)));
    div.appendChild(meta);
    return div;
  }

  function renderMarkdown(text, into) {
    try {
      MD.render(text, into);
    } catch (e) {  // never lose an answer to the renderer: show it as plain text
      into.textContent = text;
    }
  }

  function button(text, id, onClick) {
    const b = el("button", null, text);
    b.type = "button";
    b.id = id;
    b.addEventListener("click", onClick);
    return b;
  }

  function render() {
    renderChatList();
    const box = $("messages");
    box.replaceChildren();
    const chat = currentChat();
    if (!chat || !chat.messages.length) {
      box.appendChild(el("div", "empty", state.model ? `Ask ${state.model} anything.` : ""));
      return;
    }
    chat.messages.forEach((m, i) => box.appendChild(messageElement(m, i, chat)));
    box.scrollTop = box.scrollHeight;
  }

  // Re-render only the answer being streamed, at most every RENDER_MS: the page shares the CPU with the model when
  // both run on one machine, and re-rendering each token's Markdown would slow the answer it shows.
  const RENDER_MS = 100;
  let pending = null;
  function renderStreaming(msg) {
    if (pending !== null) return;
    pending = setTimeout(() => {
      pending = null;
      const box = $("messages");
      const el = box.lastElementChild;
      if (!el || !el.classList.contains("assistant")) return;
      const stick = box.scrollHeight - box.scrollTop - box.clientHeight < 60;
      renderMarkdown(msg.content, el.querySelector(".body"));
      el.querySelector(".msg-stats").textContent = statsText(msg.stats);
      $("stats").textContent = statsText(msg.stats, true);
      if (stick) box.scrollTop = box.scrollHeight;
    }, RENDER_MS);
  }

  function setBusy(busy) {
    $("send").hidden = busy;
    $("stop").hidden = !busy;
    $("send").disabled = !state.model;
  }

  function showBanner(text, isError) {
    const b = $("banner");
    b.textContent = text;
    b.className = isError ? "error" : "";
    b.hidden = false;
  }

  function hideBanner() {
    $("banner").hidden = true;
  }

  // ---- the server ------------------------------------------------------------------------------------------------
  function headers() {
    const h = { "Content-Type": "application/json" };
    if (state.apiKey) h.Authorization = `Bearer ${state.apiKey}`;
    return h;
  }

  async function errorMessage(response) {
    const text = await response.text();
    try {
      const body = JSON.parse(text);
      if (body.error && body.error.message) return `${response.status}: ${body.error.message}`;
    } catch (e) { /* not JSON */ }
    return `${response.status} ${response.statusText}${text ? ": " + text.slice(0, 300) : ""}`;
  }

  function retryLater(ms) {
    clearTimeout(state.retry);
    state.retry = setTimeout(connect, ms);
  }

  // /health until ready, then /v1/models (which needs the key, if the server has one). One attempt at a time.
  let connecting = null;
  function connect() {
    clearTimeout(state.retry);
    if (!connecting) connecting = tryConnect().finally(() => { connecting = null; });
    return connecting;
  }

  async function tryConnect() {
    let health;
    try {
      health = await fetch("health", { cache: "no-store" });
    } catch (e) {
      showBanner("The server is unreachable. Retrying\u2026", true);
      return retryLater(2000);
    }
    if (health.status === 503) {
      const body = await health.json().catch(() => ({}));
      if (body.status === "error") {
        showBanner(`The model failed to load: ${body.error}`, true);
        return retryLater(5000);
      }
      showBanner("The model is loading\u2026 the page connects as soon as it is ready.");
      return retryLater(1000);
    }
    if (!health.ok) {
      showBanner(`The server's /health answered ${await errorMessage(health)}`, true);
      return retryLater(2000);
    }
    let models;
    try {
      models = await fetch("v1/models", { headers: headers(), cache: "no-store" });
    } catch (e) {
      showBanner("The server is unreachable. Retrying\u2026", true);
      return retryLater(2000);
    }
    if (models.status === 401) {
      $("change-key").hidden = false;
      showBanner("This server needs an API key.", true);
      return askKey(state.apiKey ? "The saved API key was refused." : "");
    }
    if (!models.ok) {
      showBanner(`Listing the models failed: ${await errorMessage(models)}`, true);
      return retryLater(3000);
    }
    const card = (await models.json()).data[0];
    state.model = card.id;
    state.contextSize = card.max_model_len || null;
    $("model-name").textContent = card.id;
    $("model-ctx").textContent = state.contextSize ? `context ${state.contextSize.toLocaleString("en-US")} tokens` : "";
    document.title = `${card.id} \u00b7 MLC LLM chat`;
    hideBanner();
    setBusy(!!state.controller);
    if (!state.controller) render();  // a render now would cut into the answer being streamed
  }

  function askKey(error) {
    $("key-error").textContent = error || "";
    $("key-error").hidden = !error;
    $("key-input").value = "";
    if (!$("key-dialog").open) $("key-dialog").showModal();
    $("key-input").focus();
  }

  async function submitKey(ev) {
    ev.preventDefault();
    const key = $("key-input").value.trim();
    if (!key) return askKey("Enter the key.");
    let r;
    try {
      r = await fetch("v1/models", { headers: { Authorization: `Bearer ${key}` }, cache: "no-store" });
    } catch (e) {
      return askKey("The server is unreachable.");
    }
    if (r.status === 401) return askKey("This key was refused by the server.");
    state.apiKey = key;
    store.set("apiKey", key);
    $("key-dialog").close();
    connect();
  }

  function requestMessages(history) {
    const out = [];
    const system = $("system").value.trim();
    if (system) out.push({ role: "system", content: system });
    for (const m of history) {
      if (m.role === "assistant") {
        // earlier tool calls go back as their JSON text: the page has no way to run tools and answer them
        const calls = (m.toolCalls || []).map((c) => JSON.stringify({ name: c.name, arguments: c.arguments }));
        const content = [m.content, ...calls].filter(Boolean).join("\n");
        if (content) out.push({ role: "assistant", content });
      } else {
        out.push({ role: m.role, content: m.content });
      }
    }
    return out;
  }

  function handleChunk(chunk, reply, clock) {
    if (chunk.error) {
      reply.error = chunk.error.message || JSON.stringify(chunk.error);
      return;
    }
    const choice = (chunk.choices || [])[0];
    if (choice) {
      const delta = choice.delta || {};
      if (delta.content) {
        const now = performance.now();
        if (clock.first === null) clock.first = now;
        clock.chunks += 1;
        reply.content += delta.content;
        const seconds = (now - clock.first) / 1000;
        reply.stats = { ttft: (clock.first - clock.start) / 1000,
                        tps: seconds > 0.2 ? (clock.chunks - 1) / seconds : null };
      }
      for (const call of delta.tool_calls || []) {
        reply.toolCalls = reply.toolCalls || [];
        const i = call.index || 0;
        const slot = reply.toolCalls[i] || (reply.toolCalls[i] = { name: "", arguments: "" });
        if (call.function && call.function.name) slot.name += call.function.name;
        if (call.function && call.function.arguments) slot.arguments += call.function.arguments;
      }
      if (choice.finish_reason) reply.finish = choice.finish_reason;
    }
    if (chunk.usage) {
      const extra = chunk.usage.extra || {};
      const live = reply.stats || {};
      reply.stats = { ttft: extra.ttft_s ?? live.ttft, tps: extra.decode_tokens_per_s ?? live.tps,
                      prompt: chunk.usage.prompt_tokens, completion: chunk.usage.completion_tokens };
    }
  }

  async function streamReply(chat) {
    const reply = chat.messages[chat.messages.length - 1];
    let fields;
    try {
      fields = samplingFields();
    } catch (e) {
      reply.error = e.message;
      return;
    }
    const body = { model: state.model, messages: requestMessages(chat.messages.slice(0, -1)), stream: true,
                   stream_options: { include_usage: true }, ...fields };
    const controller = new AbortController();
    state.controller = controller;
    setBusy(true);
    render();
    const box = $("messages");
    box.lastElementChild.classList.add("streaming");
    const clock = { start: performance.now(), first: null, chunks: 0 };
    try {
      const r = await fetch("v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body),
                                                     signal: controller.signal });
      if (!r.ok) {
        reply.error = await errorMessage(r);
        if (r.status === 401) connect();
        return;
      }
      const reader = r.body.getReader();
      const decoder = new TextDecoder();
      let buf = "";
      // Server-sent events: blank-line separated, any line ending; an event's data lines joined by newlines.
      const dispatch = (event) => {
        const data = event.split("\n").filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(l.startsWith("data: ") ? 6 : 5)).join("\n");
        if (!data || data.trim() === "[DONE]") return;
        try {
          handleChunk(JSON.parse(data), reply, clock);
        } catch (e) {
          reply.error = `could not read the server's answer: ${e.message}`;
        }
      };
      for (;;) {
        const { value, done } = await reader.read();
        buf += done ? decoder.decode() : decoder.decode(value, { stream: true });
        buf = buf.replace(/\r\n?/g, "\n");  // a lone \r at a read boundary is taken as a line end early: harmless
        let end;
        while ((end = buf.indexOf("\n\n")) >= 0) {
          dispatch(buf.slice(0, end));
          buf = buf.slice(end + 2);
        }
        if (done) {
          if (buf.trim()) dispatch(buf);  // a last event without its blank line
          break;
        }
        renderStreaming(reply);
      }
      reply.truncated = reply.finish === "length";
    } catch (e) {
      if (!controller.signal.aborted) {
        reply.error = `The connection to the server failed: ${e.message}`;
        connect();
      }
    } finally {
      reply.stopped = controller.signal.aborted;
      clearTimeout(pending);  // the full render below replaces any partial one still due
      pending = null;
      state.controller = null;
      chat.updated = Date.now();
      saveChats();
      setBusy(false);
      render();
      $("stats").textContent = statsText(reply.stats, true);
    }
  }

  // Whether a request can be sent now; says why not.
  function canSend() {
    if (state.controller) return false;
    if (!state.model) {
      showBanner("Not connected to a model yet.", true);
      return false;
    }
    if (!checkSettings()) {
      $("settings").hidden = false;
      return false;
    }
    return true;
  }

  async function send(text) {
    if (!canSend()) return;
    const chat = currentChat() || newChat();
    if (text) {
      chat.messages.push({ role: "user", content: text });
      if (chat.title === "New chat") chat.title = text.replace(/\s+/g, " ").slice(0, 48);
    }
    chat.messages.push({ role: "assistant", content: "" });
    saveChats();
    await streamReply(chat);
  }

  function stop() {
    if (state.controller) state.controller.abort();
  }

  function regenerate() {
    const chat = currentChat();
    if (!chat || !canSend()) return;
    if (chat.messages.length && chat.messages[chat.messages.length - 1].role === "assistant") chat.messages.pop();
    send("");
  }

  function editFrom(index) {
    const chat = currentChat();
    if (!chat || state.controller) return;
    $("prompt").value = chat.messages[index].content;
    chat.messages.splice(index);
    saveChats();
    render();
    $("prompt").focus();
  }

  // ---- theme -----------------------------------------------------------------------------------------------------
  function applyTheme(theme) {
    document.documentElement.dataset.theme = theme;
    $("theme").textContent = theme === "dark" ? "Light theme" : "Dark theme";
  }

  // ---- wiring ----------------------------------------------------------------------------------------------------
  function init() {
    const prefersDark = window.matchMedia && window.matchMedia("(prefers-color-scheme: dark)").matches;
    applyTheme(store.get("theme", prefersDark ? "dark" : "light"));
    $("theme").addEventListener("click", () => {
      const next = document.documentElement.dataset.theme === "dark" ? "light" : "dark";
      store.set("theme", next);
      applyTheme(next);
    });
    loadSettings();
    for (const id of Object.values(FIELDS)) $(id).addEventListener("input", () => { saveSettings(); checkSettings(); });
    $("output-mode").addEventListener("change", () => { showOutputBox(); saveSettings(); checkSettings(); });
    $("reset-settings").addEventListener("click", () => {
      for (const id of Object.values(FIELDS)) $(id).value = { "output-mode": "text", "tool-choice": "auto" }[id] || "";
      showOutputBox();
      saveSettings();
      checkSettings();
    });
    $("toggle-settings").addEventListener("click", () => { $("settings").hidden = !$("settings").hidden; });
    $("toggle-sidebar").addEventListener("click", () => $("sidebar").classList.toggle("collapsed"));
    $("new-chat").addEventListener("click", () => {
      if (state.controller) return;
      const chat = currentChat();
      if (!chat || chat.messages.length) newChat();
      render();
      $("prompt").focus();
    });
    $("composer").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const text = $("prompt").value;
      if (!text.trim() || !canSend()) return;  // the text stays in the box until it is really sent
      $("prompt").value = "";
      send(text);
    });
    $("prompt").addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
        ev.preventDefault();
        $("composer").requestSubmit();
      }
    });
    $("stop").addEventListener("click", stop);
    $("key-form").addEventListener("submit", submitKey);
    $("change-key").addEventListener("click", () => askKey(""));
    if (!currentChat()) state.current = null;
    setBusy(false);
    render();
    connect();
  }

  init();
})();
