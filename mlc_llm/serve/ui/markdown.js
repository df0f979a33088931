// A small Markdown renderer that builds DOM nodes and never parses HTML: model output is text, so whatever it
// contains (<script>, <img onerror>, javascript: links) can only ever appear as characters on the page.
// Covers what chat answers use: fenced code (an unclosed fence while streaming is still a code block), headings,
// lists, quotes, rules, paragraphs, and inline code / bold / italic / links (http, https and mailto only).
"use strict";

const MD = (() => {
  const INLINE = [
    // [name, regex]; the earliest match wins, ties go to the earlier pattern
    ["code", /`([^`\n]+)`/],
    // underscores emphasise only at word edges (snake_case and __dunder__ names stay as written)
    ["bold", /\*\*(?=\S)([\s\S]*?\S)\*\*|(?<!\w)__(?=\S)([\s\S]*?\S)__(?!\w)/],
    ["italic", /\*(?=[^\s*])([^*\n]*?[^\s*])\*|(?<!\w)_(?=[^\s_])([^_\n]*?[^\s_])_(?!\w)/],
    ["link", /\[([^\]\n]+)\]\(([^)\s]+)\)/],
  ];
  const SAFE_URL = /^(https?:|mailto:)/i;

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function inline(text, parent) {
    while (text) {
      let best = null;
      for (const [name, re] of INLINE) {
        const m = re.exec(text);
        if (m && (best === null || m.index < best.m.index)) best = { name, m };
      }
      if (best === null) {
        parent.appendChild(document.createTextNode(text));
        return;
      }
      const { name, m } = best;
      if (m.index > 0) parent.appendChild(document.createTextNode(text.slice(0, m.index)));
      const inner = m[1] !== undefined ? m[1] : m[2];
      if (name === "code") {
        parent.appendChild(el("code", null, inner));
      } else if (name === "bold" || name === "italic") {
        const e = el(name === "bold" ? "strong" : "em");
        inline(inner, e);
        parent.appendChild(e);
      } else if (SAFE_URL.test(m[2])) {
        const a = el("a");
        a.href = m[2];
        a.target = "_blank";
        a.rel = "noopener noreferrer";
        inline(m[1], a);
        parent.appendChild(a);
      } else {
        parent.appendChild(document.createTextNode(m[0]));
      }
      text = text.slice(m.index + m[0].length);
    }
  }

  function lines(textLines, parent) {
    // paragraph: consecutive lines joined by line breaks
    const p = el("p");
    textLines.forEach((l, i) => {
      if (i) p.appendChild(el("br"));
      inline(l, p);
    });
    parent.appendChild(p);
  }

  function codeBlock(lang, body, parent) {
    const wrap = el("div", "code-block");
    const bar = el("div", "code-bar");
    bar.appendChild(el("span", "code-lang", lang || "text"));
    const copy = el("button", "copy", "Copy");
    copy.type = "button";
    copy.addEventListener("click", () => {
      const done = () => { copy.textContent = "Copied"; setTimeout(() => { copy.textContent = "Copy"; }, 1200); };
      if (navigator.clipboard) navigator.clipboard.writeText(body).then(done, () => {});
    });
    bar.appendChild(copy);
    wrap.appendChild(bar);
    const pre = el("pre");
    pre.appendChild(el("code", lang ? "lang-" + lang.replace(/[^\w-]/g, "") : null, body));
    wrap.appendChild(pre);
    parent.appendChild(wrap);
  }

  const LIST_ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;

  function render(text, parent) {
    parent.replaceChildren();
    const src = text.replace(/\r\n?/g, "\n").split("\n");
    let i = 0;
    let para = [];
    const flush = () => { if (para.length) { lines(para, parent); para = []; } };
    while (i < src.length) {
      const line = src[i];
      const fence = /^\s*(```+|~~~+)\s*([\w+#.-]*)\s*$/.exec(line);
      if (fence) {
        flush();
        const body = [];
        i++;
        while (i < src.length && !src[i].trim().startsWith(fence[1])) body.push(src[i++]);
        i++; // the closing fence (or past the end while a stream is still inside the block)
        codeBlock(fence[2], body.join("\n"), parent);
        continue;
      }
      if (!line.trim()) { flush(); i++; continue; }
      const heading = /^(#{1,6})\s+(.*?)\s*#*\s*$/.exec(line);
      if (heading) {
        flush();
        const h = el("h" + Math.min(heading[1].length + 2, 6));
        inline(heading[2], h);
        parent.appendChild(h);
        i++;
        continue;
      }
      if (/^\s*([-*_])(\s*\1){2,}\s*$/.test(line)) { flush(); parent.appendChild(el("hr")); i++; continue; }
      if (/^\s*>/.test(line)) {
        flush();
        const quoted = [];
        while (i < src.length && /^\s*>/.test(src[i])) quoted.push(src[i++].replace(/^\s*>\s?/, ""));
        const q = el("blockquote");
        render(quoted.join("\n"), q);
        parent.appendChild(q);
        continue;
      }
      const item = LIST_ITEM.exec(line);
      if (item) {
        flush();
        const ordered = /\d/.test(item[2]);
        const list = el(ordered ? "ol" : "ul");
        if (ordered && parseInt(item[2], 10) !== 1) list.start = parseInt(item[2], 10);
        while (i < src.length) {
          const it = LIST_ITEM.exec(src[i]);
          if (!it || /\d/.test(it[2]) !== ordered) break;
          const li = el("li");
          inline(it[3], li);
          i++;
          // continuation lines (indented, not a new item) belong to this item
          while (i < src.length && /^\s{2,}\S/.test(src[i]) && !LIST_ITEM.exec(src[i])) {
            li.appendChild(el("br"));
            inline(src[i++].trim(), li);
          }
          list.appendChild(li);
        }
        parent.appendChild(list);
        continue;
      }
      para.push(line);
      i++;
    }
    flush();
  }

  return { render };
})();
