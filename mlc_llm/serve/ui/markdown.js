// A small Markdown renderer that builds DOM nodes and never parses HTML: model output is text, so whatever it
// contains (<script>, <img onerror>, javascript: links) can only ever appear as characters on the page.
// Covers what chat answers use: fenced code (an unclosed fence while streaming is still a code block; fences inside
// list items too), headings, lists, quotes, rules, paragraphs, and inline code / bold / italic / links (http, https and
// mailto only). Every pattern is bounded or anchored so that a degenerate answer renders in linear time: the page
// re-renders a streaming answer several times a second.
"use strict";

const MD = (() => {
  // One scan for the earliest inline construct; the alternatives' groups: code 1, bold 2|3, italic 4|5, link 6+7.
  // Underscores emphasise only at word edges (snake_case and a.__x stay as written).
  const INLINE = new RegExp([
    "`([^`\\n]{1,2000})`",
    "\\*\\*(?=\\S)([^\\n]{0,500}?\\S)\\*\\*|(?<!\\w)__(?=\\S)([^\\n]{0,500}?\\S)__(?!\\w)",
    "\\*(?=[^\\s*])([^*\\n]{0,500}?[^\\s*])\\*|(?<!\\w)_(?=[^\\s_])([^_\\n]{0,500}?[^\\s_])_(?!\\w)",
    "\\[([^\\[\\]\\n]{1,500})\\]\\(([^()\\s]{1,2000})\\)",
  ].join("|"), "g");
  const SAFE_URL = /^(https?:|mailto:)/i;
  const FENCE = /^([ \t]*)(`{3,}(?![^`]*`)|~{3,})[ \t]*([\w+#.-]*)/;  // a backtick fence's info has no backtick
  const LIST_ITEM = /^([ \t]*)([-*+]|\d{1,9}[.)])[ \t]+(.*)$/;
  const MAX_QUOTE_DEPTH = 8;

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function inline(text, parent, depth = 0) {
    const re = new RegExp(INLINE.source, "g");
    let at = 0;
    let m;
    while ((m = re.exec(text)) !== null) {
      if (m.index > at) parent.appendChild(document.createTextNode(text.slice(at, m.index)));
      at = re.lastIndex;
      if (m[1] !== undefined) {
        parent.appendChild(el("code", null, m[1]));
      } else if (m[6] !== undefined && !SAFE_URL.test(m[7])) {
        parent.appendChild(document.createTextNode(m[0]));  // an unsafe link stays text
      } else {
        const inner = m[2] ?? m[3] ?? m[4] ?? m[5] ?? m[6];
        let e;
        if (m[6] !== undefined) {
          e = el("a");
          e.href = m[7];
          e.target = "_blank";
          e.rel = "noopener noreferrer";
        } else {
          e = el(m[2] !== undefined || m[3] !== undefined ? "strong" : "em");
        }
        if (depth < 4) inline(inner, e, depth + 1);
        else e.textContent = inner;
        parent.appendChild(e);
      }
    }
    if (at < text.length) parent.appendChild(document.createTextNode(text.slice(at)));
  }

  function paragraph(textLines, parent) {
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
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(body).then(done, () => {});
      } else {  // plain http on another host: select the code so Ctrl+C copies it
        const range = document.createRange();
        range.selectNodeContents(pre);
        const sel = window.getSelection();
        sel.removeAllRanges();
        sel.addRange(range);
      }
    });
    bar.appendChild(copy);
    wrap.appendChild(bar);
    const pre = el("pre");
    pre.appendChild(el("code", lang ? "lang-" + lang.replace(/[^\w-]/g, "") : null, body));
    wrap.appendChild(pre);
    parent.appendChild(wrap);
  }

  // A fenced block from src[i] (a fence line); returns the index after it. Body lines lose the fence's indentation.
  function fenced(src, i, parent) {
    const [, indent, fence, lang] = FENCE.exec(src[i]);
    const body = [];
    i++;
    while (i < src.length) {
      const t = src[i].trim();
      if (t.length >= fence.length && t[0] === fence[0] && t.split("").every((c) => c === fence[0])) break;
      body.push(src[i].startsWith(indent) ? src[i].slice(indent.length) : src[i].trimStart());
      i++;
    }
    codeBlock(lang, body.join("\n"), parent);
    return i + 1;  // past the closing fence (or the end, while a stream is still inside the block)
  }

  function heading(line) {
    const m = /^(#{1,6})[ \t]+(.*)$/.exec(line);
    if (!m) return null;
    let text = m[2].trimEnd();
    let end = text.length;  // an optional closing run of #, after a space
    while (end > 0 && text[end - 1] === "#") end--;
    if (end < text.length && (end === 0 || text[end - 1] === " " || text[end - 1] === "\t")) {
      text = text.slice(0, end).trimEnd();
    }
    return [m[1].length, text];
  }

  // A list from src[i] (an item line) into parent; returns the index after it. Items more indented than the list's
  // nest a list inside the item before them; other indented lines (a fenced block too) continue that item.
  function listBlock(src, i, parent, depth) {
    const first = LIST_ITEM.exec(src[i]);
    const indent = first[1].length;
    const ordered = /\d/.test(first[2]);
    const list = el(ordered ? "ol" : "ul");
    if (ordered && parseInt(first[2], 10) !== 1) list.start = parseInt(first[2], 10);
    let li = null;
    while (i < src.length) {
      let next = i;  // blank lines between items keep one list (and its numbering)
      while (next < src.length && !src[next].trim()) next++;
      if (next >= src.length) break;
      const line = src[next];
      const lead = line.length - line.trimStart().length;
      const it = LIST_ITEM.exec(line);
      if (it && lead <= indent + 1) {
        if (lead < indent || /\d/.test(it[2]) !== ordered) break;
        li = el("li");
        inline(it[3], li);
        list.appendChild(li);
        i = next + 1;
      } else if (li && lead > indent) {
        if (it && depth < 6) i = listBlock(src, next, li, depth + 1);
        else if (FENCE.test(line)) i = fenced(src, next, li);
        else {
          li.appendChild(el("br"));
          inline(line.trim(), li);
          i = next + 1;
        }
      } else {
        break;
      }
    }
    parent.appendChild(list);
    return i;
  }

  function render(text, parent, depth = 0) {
    parent.replaceChildren();
    const src = text.replace(/\r\n?/g, "\n").split("\n");
    let i = 0;
    let para = [];
    const flush = () => { if (para.length) { paragraph(para, parent); para = []; } };
    while (i < src.length) {
      const line = src[i];
      if (FENCE.test(line)) {
        flush();
        i = fenced(src, i, parent);
        continue;
      }
      if (!line.trim()) { flush(); i++; continue; }
      const h = heading(line);
      if (h) {
        flush();
        const e = el("h" + Math.min(h[0] + 2, 6));
        inline(h[1], e);
        parent.appendChild(e);
        i++;
        continue;
      }
      if (/^[ \t]*([-*_])([ \t]*\1){2,}[ \t]*$/.test(line)) { flush(); parent.appendChild(el("hr")); i++; continue; }
      if (/^[ \t]*>/.test(line)) {
        flush();
        const quoted = [];
        while (i < src.length && /^[ \t]*>/.test(src[i])) quoted.push(src[i++].replace(/^[ \t]*> ?/, ""));
        const q = el("blockquote");
        if (depth < MAX_QUOTE_DEPTH) render(quoted.join("\n"), q, depth + 1);
        else q.textContent = quoted.join("\n");
        parent.appendChild(q);
        continue;
      }
      if (LIST_ITEM.test(line)) {
        flush();
        i = listBlock(src, i, parent, 0);
        continue;
      }
      para.push(line);
      i++;
    }
    flush();
  }

  return { render: (text, parent) => render(String(text), parent), el };
})();
