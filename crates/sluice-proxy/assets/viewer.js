// Sluice trace viewer. Served at /viewer and /viewer/traces/{traceId} under a
// strict CSP (script-src 'self', style-src 'self', connect-src 'self').
//
// Everything the gateway returns (paths, headers, trace data) is client input:
// the DOM is built only with createElement, textContent and setAttribute,
// never from markup strings.
'use strict';

(function () {
  const TOKEN_KEY = 'sluice.operatorToken';
  const SECTIONS = ['inbound', 'backend', 'outbound', 'on-error'];
  const FILTERS = ['subscription', 'deployment', 'status', 'since', 'traced'];
  const VIEWS = { token: 'token-section', list: 'list-section', trace: 'trace-section' };
  const $ = (id) => document.getElementById(id);

  // Each route() bumps this; a response that arrives for an older one is dropped.
  let generation = 0;
  // The list URL (with its filters) that "Recent requests" goes back to.
  let listUrl = '/viewer';

  // ---- The operator token: sessionStorage only (never localStorage, never the URL).

  function getToken() {
    try {
      return sessionStorage.getItem(TOKEN_KEY) || '';
    } catch (e) {
      return '';
    }
  }

  function setToken(token) {
    sessionStorage.setItem(TOKEN_KEY, token);
  }

  function clearToken() {
    try {
      sessionStorage.removeItem(TOKEN_KEY);
    } catch (e) {
      // Storage unavailable: nothing was kept.
    }
  }

  // ---- DOM helpers

  // el('a', {className: 'x', href: '/y', text: 'z'}, [children]).
  function el(tag, props, children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value === undefined || value === null) continue;
      if (key === 'text') node.textContent = String(value);
      else if (key === 'className') node.className = value;
      else node.setAttribute(key, String(value));
    }
    for (const child of children || []) {
      if (child === undefined || child === null) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  // A value for display: '—' when absent.
  function show(value) {
    return value === undefined || value === null || value === '' ? '—' : String(value);
  }

  function setView(name) {
    for (const [view, id] of Object.entries(VIEWS)) $(id).hidden = view !== name;
  }

  function setStatus(message) {
    $('status').textContent = message || '';
  }

  function showError(message) {
    const box = $('error');
    box.textContent = message;
    box.hidden = false;
  }

  function clearError() {
    const box = $('error');
    box.textContent = '';
    box.hidden = true;
  }

  // "2026-12-01T10:00:00.1234567Z" -> "2026-12-01 10:00:00.123" (the list says UTC).
  function formatTime(iso) {
    if (typeof iso !== 'string') return '—';
    const m = /^(\d{4}-\d{2}-\d{2})T(\d{2}:\d{2}:\d{2})(\.\d{1,3})?\d*(Z|[+-]\d{2}:?\d{2})?$/.exec(iso);
    if (!m) return iso;
    return m[1] + ' ' + m[2] + (m[3] || '') + (m[4] && m[4] !== 'Z' ? ' ' + m[4] : '');
  }

  // A .NET TimeSpan ("[-][d.]hh:mm:ss[.fffffff]") in milliseconds, NaN if not one.
  function parseElapsed(text) {
    const m = /^(-)?(?:(\d+)\.)?(\d+):(\d{2}):(\d{2})(?:\.(\d+))?$/.exec(String(text || ''));
    if (!m) return NaN;
    const seconds = Number(m[2] || 0) * 86400 + Number(m[3]) * 3600 + Number(m[4]) * 60 +
      Number(m[5]) + (m[6] ? Number('0.' + m[6]) : 0);
    return (m[1] ? -1 : 1) * seconds * 1000;
  }

  function formatMs(ms) {
    return ms.toFixed(ms < 10 ? 3 : 1) + ' ms';
  }

  // ---- The management API

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  async function api(path) {
    let response;
    try {
      response = await fetch(path, {
        headers: { Authorization: 'Bearer ' + getToken(), Accept: 'application/json' },
        cache: 'no-store',
        credentials: 'omit',
        redirect: 'error',
      });
    } catch (e) {
      throw new ApiError(0, 'NetworkError', 'the gateway could not be reached');
    }
    let body = null;
    try {
      body = await response.json();
    } catch (e) {
      body = null;
    }
    if (!response.ok) {
      const error = (body && typeof body.error === 'object' && body.error) || {};
      throw new ApiError(response.status, show(error.code || response.status),
        String(error.message || response.statusText || 'the request failed'));
    }
    if (body === null || typeof body !== 'object') {
      throw new ApiError(response.status, 'BadResponse', 'the gateway did not answer with JSON');
    }
    return body;
  }

  // A failed call: a 401 asks for the token again, anything else is shown.
  function failed(error, what) {
    setStatus('');
    if (error.status === 401) {
      clearToken();
      askForToken();
      showError('The gateway rejected the operator token (401 Unauthorized). Paste a valid operator token.');
      return;
    }
    const where = error.status ? ' (' + error.status + ' ' + error.code + ')' : '';
    showError(what + ' failed: ' + error.message + where + '.');
  }

  // ---- Views

  function askForToken() {
    $('forget-token').hidden = true;
    setView('token');
    document.title = 'Operator token – Sluice trace viewer';
    $('token').focus();
  }

  function traceIdFromPath(pathname) {
    const m = /^\/viewer\/traces\/([^/]+)\/?$/.exec(pathname);
    if (!m) return null;
    try {
      return decodeURIComponent(m[1]);
    } catch (e) {
      return null;
    }
  }

  function traceHref(traceId) {
    return '/viewer/traces/' + encodeURIComponent(traceId);
  }

  async function route() {
    const gen = ++generation;
    clearError();
    setStatus('');
    if (!getToken()) {
      askForToken();
      return;
    }
    $('forget-token').hidden = false;
    const traceId = traceIdFromPath(location.pathname);
    if (traceId === null) await showList(gen);
    else await showTrace(traceId, gen);
  }

  function navigate(url) {
    if (url !== location.pathname + location.search) history.pushState(null, '', url);
    route();
  }

  async function showList(gen) {
    setView('list');
    document.title = 'Recent requests – Sluice trace viewer';
    listUrl = location.pathname + location.search;
    $('back-to-list').setAttribute('href', listUrl);
    const params = new URLSearchParams(location.search);
    const query = new URLSearchParams();
    for (const name of FILTERS) {
      const input = $('f-' + name);
      const value = (params.get(name) || '').trim();
      if (input.type === 'checkbox') input.checked = value === 'true';
      else input.value = value;
      if (value) query.set(name, value);
    }
    const tbody = $('summaries').tBodies[0];
    $('list-count').textContent = '';
    setStatus('Loading the requests…');
    let data;
    try {
      const q = query.toString();
      data = await api('/traces' + (q ? '?' + q : ''));
    } catch (error) {
      if (gen !== generation) return;
      tbody.replaceChildren();
      $('list-count').textContent = '';
      failed(error, 'Loading the requests');
      return;
    }
    if (gen !== generation) return;
    const summaries = Array.isArray(data.summaries) ? data.summaries : [];
    if (summaries.length === 0) {
      tbody.replaceChildren(el('tr', { className: 'empty' }, [
        el('td', { colspan: 9, text: 'No requests match.' }),
      ]));
    } else {
      tbody.replaceChildren(...summaries.map(summaryRow));
    }
    setStatus('');
    $('list-count').textContent = summaries.length === 1 ? '1 request, newest first.' : summaries.length + ' requests, newest first.';
  }

  function summaryRow(s) {
    const cell = (content, className) =>
      el('td', { className }, [content instanceof Node ? content : show(content)]);
    const traced = typeof s.traceId === 'string' && s.traceId !== '';
    const path = traced
      ? el('a', { href: traceHref(s.traceId), title: 'Trace ' + s.traceId }, [show(s.path)])
      : el('span', {}, [show(s.path)]);
    const pathCell = el('td', { className: 'path' }, [path]);
    if (s.api) pathCell.append(' ', el('span', { className: 'tag', text: s.api }));
    if (s.stream === true) pathCell.append(' ', el('span', { className: 'tag', text: 'stream' }));
    const status = Number(s.status);
    const statusCell = cell(s.status, 'status status-' + (status >= 100 && status < 600 ? Math.floor(status / 100) + 'xx' : 'other'));
    if (Number(s.attempts) > 1) statusCell.append(el('span', { className: 'hint', text: ' ' + s.attempts + ' attempts' }));
    const tokens = [s.promptTokens, s.completionTokens, s.totalTokens];
    const backend = s.backend ? s.backend + (s.region ? ' (' + s.region + ')' : '') : s.region;
    const row = el('tr', { className: traced ? 'traced' : 'untraced', 'data-trace-id': traced ? s.traceId : null }, [
      cell(el('time', { datetime: typeof s.time === 'string' ? s.time : null, title: s.time, text: formatTime(s.time) }), 'time'),
      cell(s.method, 'method'),
      pathCell,
      cell(s.subscription, 'subscription'),
      cell(s.deployment, 'deployment'),
      cell(backend, 'backend'),
      statusCell,
      cell(tokens.every((t) => t === null || t === undefined) ? null : tokens.map(show).join(' / '), 'tokens num'),
      cell(typeof s.latencyMs === 'number' ? formatMs(s.latencyMs) : null, 'latency num'),
    ]);
    return row;
  }

  async function showTrace(traceId, gen) {
    setView('trace');
    document.title = 'Trace ' + traceId + ' – Sluice trace viewer';
    $('trace-id').textContent = traceId;
    $('trace').replaceChildren();
    setStatus('Loading the trace…');
    let data;
    try {
      data = await api('/traces/' + encodeURIComponent(traceId));
    } catch (error) {
      if (gen !== generation) return;
      if (error.status === 404) {
        setStatus('');
        showError('There is no trace ' + traceId + ': it may have expired, or the request was not traced.');
      } else {
        failed(error, 'Loading the trace');
      }
      return;
    }
    if (gen !== generation) return;
    renderTrace(data);
    setStatus('');
    $('trace-heading').focus();
  }

  function renderTrace(trace) {
    const entries = (trace && typeof trace.traceEntries === 'object' && trace.traceEntries) || {};
    const names = SECTIONS.concat(Object.keys(entries).filter((k) => !SECTIONS.includes(k)));
    const sections = names.filter((name) => Array.isArray(entries[name]) && entries[name].length > 0);
    const all = sections.flatMap((name) => entries[name]);
    const times = all.map((e) => parseElapsed(e && e.elapsed)).filter(Number.isFinite);
    const total = times.length ? Math.max(0, ...times) : 0;
    const parts = [el('p', { className: 'meta' }, [
      show(trace.serviceName) + ' · ' + all.length + (all.length === 1 ? ' entry' : ' entries') +
        (total > 0 ? ' · last at ' + formatMs(total) : ''),
    ])];
    for (const name of sections) {
      parts.push(el('section', { className: 'phase', 'data-section': name, 'aria-labelledby': 'phase-' + name }, [
        el('h2', { id: 'phase-' + name, text: name }),
        el('ol', { className: 'entries' }, entries[name].map((e) => entryItem(e || {}, total))),
      ]));
    }
    if (sections.length === 0) parts.push(el('p', { className: 'empty', text: 'This trace has no entries.' }));
    $('trace').replaceChildren(...parts);
  }

  function entryItem(entry, total) {
    const ms = parseElapsed(entry.elapsed);
    const item = el('li', { className: 'entry' }, [
      el('div', { className: 'entry-head' }, [
        el('span', { className: 'source', text: show(entry.source) }),
        el('span', { className: 'elapsed', title: Number.isFinite(ms) ? formatMs(ms) + ' after the request arrived' : null, text: '+' + show(entry.elapsed) }),
        el('time', { className: 'timestamp', datetime: typeof entry.timestamp === 'string' ? entry.timestamp : null, title: entry.timestamp, text: formatTime(entry.timestamp) }),
      ]),
    ]);
    if (total > 0 && Number.isFinite(ms)) {
      item.append(el('meter', {
        className: 'bar', min: 0, max: total, value: Math.max(0, ms),
        'aria-label': 'at ' + formatMs(ms) + ' of ' + formatMs(total),
      }));
    }
    item.append(el('div', { className: 'data' }, [renderData(entry.data, 0)]));
    return item;
  }

  function isHeaderList(value) {
    return Array.isArray(value) && value.length > 0 && value.every((h) =>
      h !== null && typeof h === 'object' && !Array.isArray(h) && 'name' in h && 'value' in h);
  }

  function scalarText(value) {
    return typeof value === 'string' ? value : JSON.stringify(value);
  }

  // Strings as text; header lists as a table; objects as key/value lists
  // (deeper ones and other arrays as pretty-printed JSON).
  function renderData(value, depth) {
    if (value === undefined) return el('span', { className: 'none', text: '—' });
    if (typeof value === 'string') return el('span', { className: 'text', text: value });
    if (value === null || typeof value !== 'object') return el('code', { text: String(value) });
    if (isHeaderList(value)) return headerTable(value);
    if (Array.isArray(value) || depth >= 4) {
      return el('pre', { className: 'json', text: JSON.stringify(value, null, 2) });
    }
    const keys = Object.keys(value);
    if (keys.length === 0) return el('code', { text: '{}' });
    const list = el('dl', { className: 'kv' });
    for (const key of keys) list.append(el('dt', { text: key }), el('dd', {}, [renderData(value[key], depth + 1)]));
    return list;
  }

  function headerTable(headers) {
    return el('table', { className: 'headers' }, [
      el('thead', {}, [el('tr', {}, [el('th', { scope: 'col', text: 'Name' }), el('th', { scope: 'col', text: 'Value' })])]),
      el('tbody', {}, headers.map((h) => el('tr', {}, [
        el('td', { className: 'name', text: scalarText(h.name) }),
        el('td', { className: 'value', text: Array.isArray(h.value) ? h.value.map(scalarText).join(', ') : scalarText(h.value) }),
      ]))),
    ]);
  }

  // ---- Events

  $('token-form').addEventListener('submit', (event) => {
    event.preventDefault();
    const input = $('token');
    const token = input.value.trim();
    input.value = '';
    if (!token) {
      showError('Paste an operator token.');
      input.focus();
      return;
    }
    setToken(token);
    route();
  });

  $('forget-token').addEventListener('click', () => {
    clearToken();
    generation++;
    $('summaries').tBodies[0].replaceChildren();
    $('list-count').textContent = '';
    $('trace').replaceChildren();
    $('trace-id').textContent = '';
    clearError();
    askForToken();
    setStatus('The token is forgotten.');
  });

  $('filters').addEventListener('submit', (event) => {
    event.preventDefault();
    const query = new URLSearchParams();
    for (const name of FILTERS) {
      const input = $('f-' + name);
      const value = input.type === 'checkbox' ? (input.checked ? 'true' : '') : input.value.trim();
      if (value) query.set(name, value);
    }
    const q = query.toString();
    navigate('/viewer' + (q ? '?' + q : ''));
  });

  // Links inside the viewer change the page in place (each trace keeps its URL).
  document.addEventListener('click', (event) => {
    if (event.defaultPrevented || event.button !== 0 ||
      event.metaKey || event.ctrlKey || event.shiftKey || event.altKey) return;
    const link = event.target instanceof Element ? event.target.closest('a[href]') : null;
    if (!link || link.target || link.origin !== location.origin) return;
    if (link.pathname !== '/viewer' && !link.pathname.startsWith('/viewer/')) return;
    event.preventDefault();
    navigate(link.pathname + link.search);
  });

  window.addEventListener('popstate', route);

  route();
})();
