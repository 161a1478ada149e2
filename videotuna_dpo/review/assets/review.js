/* videotuna review: watch two videos in sync, label the pair, see where people overrule the scorer.
 *
 * Data comes from review-data.js (window.REVIEW, written by `videotuna review`). Labels live in a Map keyed by the
 * pair's two video paths and are kept in localStorage; when the page is served by `videotuna review --serve`
 * each change is also posted to the server, which writes labels.json. Only the shown pair's videos are loaded.
 */
(function () {
  'use strict';

  const R = window.REVIEW;
  const $ = (id) => document.getElementById(id);
  const SERVED = location.protocol === 'http:' || location.protocol === 'https:';
  const KIND = R.kind;
  const ROLES = R.roles;
  const FORMAT = 'videotuna-review-labels';
  const videos = R.videos;
  const pairs = R.pairs;
  const ACTIONS = KIND === 'pairs' ? [
    {key: '1', label: 'keep', text: 'keep', help: "the scorer's winner is better"},
    {key: '2', label: 'flip', text: 'flip', help: 'the loser is better: the scorer chose wrong'},
    {key: '3', label: 'tie', text: 'tie', help: 'no clear winner: drop the pair'},
    {key: '4', label: 'reject', role: 0, text: 'reject winner', help: 'the winner video is broken'},
    {key: '5', label: 'reject', role: 1, text: 'reject loser', help: 'the loser video is broken'},
    {key: '0', label: null, text: 'clear', help: 'remove the label'},
  ] : [
    {key: '1', label: 'base', text: 'base better', help: 'the base model made the better video'},
    {key: '2', label: 'tuned', text: 'tuned better', help: 'the tuned model made the better video'},
    {key: '3', label: 'tie', text: 'tie', help: 'no clear winner'},
    {key: '4', label: 'reject', role: 0, text: 'reject base', help: 'the base video is broken'},
    {key: '5', label: 'reject', role: 1, text: 'reject tuned', help: 'the tuned video is broken'},
    {key: '0', label: null, text: 'clear', help: 'remove the label'},
  ];
  // The label that says the first (0) or the second (1) video is the better one.
  const PREFERS = KIND === 'pairs' ? {keep: 0, flip: 1} : {base: 0, tuned: 1};
  const SIGN = KIND === 'pairs' ? 1 : -1; // gaps: winner - loser on a dataset, tuned - base on a report

  // ------------------------------------------------------------------ labels

  const pairKey = (p) => videos[p.a].path + '\n' + videos[p.b].path;
  const byKey = new Map(pairs.map((p) => [pairKey(p), p]));
  let labels = new Map();

  function roleName(p, i) {
    if (KIND === 'pairs') return ['winner', 'loser'][i];
    return i === 0 ? 'base' : 'tuned (' + p.run + ')';
  }

  function entryFor(p, label, broken) {
    const e = {};
    e[ROLES[0]] = {path: videos[p.a].path, sha256: videos[p.a].sha256};
    e[ROLES[1]] = {path: videos[p.b].path, sha256: videos[p.b].sha256};
    e.prompt = p.prompt;
    e.label = label;
    if (broken && broken.length) e.broken = broken;
    e.time = new Date().toISOString();
    return e;
  }

  /* A stored or imported label -> {pair, entry} in this page's order, or {error}. */
  function matchEntry(e) {
    const r0 = e && e[ROLES[0]], r1 = e && e[ROLES[1]];
    if (!r0 || !r1) return {error: 'malformed'};
    let p = byKey.get(r0.path + '\n' + r1.path), swapped = false;
    if (!p) { p = byKey.get(r1.path + '\n' + r0.path); swapped = !!p; }
    if (!p) return {error: 'not a pair of this page'};
    const [x, y] = swapped ? [r1, r0] : [r0, r1];
    if (videos[p.a].sha256 !== x.sha256 || videos[p.b].sha256 !== y.sha256) return {error: 'a video changed'};
    let label = e.label, broken = Array.isArray(e.broken) ? e.broken : [];
    if (!R.labels.includes(label)) return {error: 'unknown label'};
    if (swapped) {
      const prefer = PREFERS[label];
      if (prefer !== undefined) label = Object.keys(PREFERS).find((k) => PREFERS[k] === 1 - prefer);
      broken = broken.map((r) => ROLES[1 - ROLES.indexOf(r)]);
    }
    const entry = entryFor(p, label, ROLES.filter((r) => broken.includes(r)));
    if (e.time) entry.time = e.time;
    return {pair: p, entry: entry};
  }

  function documentOf(entries) {
    return {format: FORMAT, version: 1, kind: KIND, dataset: R.dataset, labels: entries};
  }

  function sortedEntries() {
    return [...labels.entries()].sort((x, y) => byKey.get(x[0]).row - byKey.get(y[0]).row).map((kv) => kv[1]);
  }

  function storeLocal() {
    try {
      localStorage.setItem(R.storage, JSON.stringify(documentOf(sortedEntries())));
    } catch (err) {
      setSaveState('labels not kept in this browser: ' + err.message, true);
    }
  }

  function readEntries(doc, into) {
    let skipped = 0;
    for (const e of (doc && Array.isArray(doc.labels)) ? doc.labels : []) {
      const m = matchEntry(e);
      if (m.pair) into.set(pairKey(m.pair), m.entry); else skipped += 1;
    }
    return skipped;
  }

  function loadLocal() {
    let doc = null;
    try { doc = JSON.parse(localStorage.getItem(R.storage) || 'null'); } catch (err) { doc = null; }
    const local = new Map();
    const skipped = readEntries(doc, local);
    return {local: local, skipped: skipped};
  }

  let queue = Promise.resolve();
  let failed = false;
  function post(body) {
    setSaveState('saving\u2026');
    queue = queue.then(() => fetch('api/labels', {
      method: 'POST', headers: {'Content-Type': 'application/json'}, body: JSON.stringify(body),
    }).then((r) => r.json().then((j) => {
      if (!r.ok) throw new Error(j.error || ('HTTP ' + r.status));
      if (!failed) setSaveState('saved to ' + j.file + ' (' + j.labels + ' labels)');
    })).catch((err) => {
      failed = true;
      setSaveState('NOT saved to disk: ' + err.message + ' (kept in this browser)', true);
    }));
    return queue;
  }

  function setSaveState(text, error) {
    const s = $('save-state');
    s.textContent = text;
    s.classList.toggle('error', !!error);
  }

  function setLabel(p, entry) {
    const key = pairKey(p);
    if (entry) labels.set(key, entry); else labels.delete(key);
    storeLocal();
    if (SERVED) post(entry ? {set: entry} : {clear: [videos[p.a].path, videos[p.b].path]});
  }

  function act(action) {
    const p = current;
    if (!p) return;
    const old = labels.get(pairKey(p));
    let entry = null;
    if (action.label === 'reject') {
      const broken = old && old.label === 'reject' ? old.broken.slice() : [];
      if (!broken.includes(ROLES[action.role])) broken.push(ROLES[action.role]);
      entry = entryFor(p, 'reject', ROLES.filter((r) => broken.includes(r)));
    } else if (action.label) {
      entry = entryFor(p, action.label);
    }
    setLabel(p, entry);
    if (action.label && $('advance').checked) advance(); else refresh();
  }

  // ------------------------------------------------------------------ values, fields, the filtered view

  function value(v, d) {
    const x = videos[v].values[d];
    return x === undefined ? null : x;
  }
  function diff(p, d) {
    const a = value(p.a, d), b = value(p.b, d);
    return a === null || b === null ? null : SIGN * (a - b);
  }
  const short = (d) => d.replace(/^normalized\//, '');
  const FIELDS = [{id: 'row', name: 'dataset order', get: (p) => p.row},
    {id: 'prompt', name: 'prompt', get: (p) => p.prompt},
    {id: 'gap', name: KIND === 'pairs' ? 'OmniScore gap' : 'OmniScore tuned \u2212 base', get: (p) => p.gap}];
  if (KIND === 'pairs') {
    FIELDS.push({id: 'weight', name: 'weight', get: (p) => p.weight});
    FIELDS.push({id: 'probability', name: 'pair probability', get: (p) => p.probability});
  }
  for (const d of R.dimensions) {
    FIELDS.push({id: 'gap:' + d, name: short(d) + ' gap', get: (p) => diff(p, d), group: d});
    FIELDS.push({id: 'a:' + d, name: short(d) + ' of ' + ROLES[0], get: (p) => value(p.a, d), group: d});
    FIELDS.push({id: 'b:' + d, name: short(d) + ' of ' + ROLES[1], get: (p) => value(p.b, d), group: d});
  }
  const fieldById = new Map(FIELDS.map((f) => [f.id, f]));

  function fillSelect(select, options) {
    select.innerHTML = '';
    for (const [val, text] of options) {
      const o = document.createElement('option');
      o.value = val;
      o.textContent = text;
      select.appendChild(o);
    }
  }
  fillSelect($('filter-state'), [['all', 'every label state'], ['unlabelled', 'unlabelled'], ['labelled', 'labelled']]
    .concat(R.labels.map((l) => [l, 'labelled ' + l])));
  fillSelect($('filter-field'), [['', 'filter on a value\u2026']].concat(
    FIELDS.filter((f) => f.id !== 'row' && f.id !== 'prompt').map((f) => [f.id, f.name])));
  fillSelect($('sort-field'), FIELDS.map((f) => [f.id, f.name]));

  let view = pairs.slice();
  let current = null;
  let descending = false;

  function stateOk(p, state) {
    const e = labels.get(pairKey(p));
    if (state === 'all') return true;
    if (state === 'unlabelled') return !e;
    if (state === 'labelled') return !!e;
    return !!e && e.label === state;
  }

  function computeView() {
    const q = $('filter-prompt').value.trim().toLowerCase();
    const state = $('filter-state').value;
    const field = fieldById.get($('filter-field').value);
    const min = parseFloat($('filter-min').value), max = parseFloat($('filter-max').value);
    view = pairs.filter((p) => {
      if (q && !p.prompt.toLowerCase().includes(q)) return false;
      if (!stateOk(p, state)) return false;
      if (field && (!isNaN(min) || !isNaN(max))) {
        const x = field.get(p);
        if (x === null || x === undefined) return false;
        if (!isNaN(min) && x < min) return false;
        if (!isNaN(max) && x > max) return false;
      }
      return true;
    });
    const sort = fieldById.get($('sort-field').value) || FIELDS[0];
    const dir = descending ? -1 : 1;
    view.sort((x, y) => {
      const a = sort.get(x), b = sort.get(y);
      if (a === b || (a === null && b === null)) return x.row - y.row;
      if (a === null || a === undefined) return 1; // values missing last, either direction
      if (b === null || b === undefined) return -1;
      return (typeof a === 'string' ? a.localeCompare(b) : a - b) * dir || x.row - y.row;
    });
  }

  // ------------------------------------------------------------------ the list (only the rows in sight exist)

  const ROW_H = 30;
  const list = $('list');

  function fmt(x, digits) {
    if (x === null || x === undefined || typeof x !== 'number') return '\u2013';
    return x.toFixed(digits === undefined ? 4 : digits);
  }

  function badge(e, short) {
    if (!e) return '';
    const full = e.label === 'reject' ? 'reject ' + e.broken.join(' + ') : e.label;
    return '<span class="badge ' + e.label + '" title="' + full + '">' + (short ? e.label : full) + '</span>';
  }

  function escapeHtml(s) {
    return String(s).replace(/[&<>"']/g, (c) => ({'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;'}[c]));
  }

  function renderList() {
    $('list-spacer').style.height = (view.length * ROW_H) + 'px';
    for (const old of list.querySelectorAll('.row')) old.remove();
    const top = list.scrollTop, height = list.clientHeight || 600;
    const first = Math.max(0, Math.floor(top / ROW_H) - 5);
    const last = Math.min(view.length, Math.ceil((top + height) / ROW_H) + 5);
    const frag = document.createDocumentFragment();
    for (let i = first; i < last; i++) {
      const p = view[i];
      const row = document.createElement('div');
      row.className = 'row' + (p === current ? ' current' : '');
      row.style.top = (i * ROW_H) + 'px';
      row.dataset.index = i;
      row.dataset.row = p.row;
      row.setAttribute('role', 'option');
      row.innerHTML = '<span class="num">#' + (p.row + 1) + '</span><span class="prompt" title="' +
        escapeHtml(p.prompt) + '">' + escapeHtml(p.prompt) + '</span><span class="gap">' + fmt(p.gap, 3) +
        '</span><span>' + badge(labels.get(pairKey(p)), true) + '</span>';
      frag.appendChild(row);
    }
    list.appendChild(frag);
    const shown = view.length === pairs.length ? pairs.length + ' pairs' : view.length + ' of ' + pairs.length + ' pairs';
    $('list-count').textContent = shown;
  }

  function scrollToCurrent() {
    const i = view.indexOf(current);
    if (i < 0) return;
    const top = list.scrollTop, height = list.clientHeight;
    if (i * ROW_H < top) list.scrollTop = i * ROW_H;
    else if ((i + 1) * ROW_H > top + height) list.scrollTop = (i + 1) * ROW_H - height;
  }

  list.addEventListener('scroll', () => requestAnimationFrame(renderList));
  list.addEventListener('click', (ev) => {
    const row = ev.target.closest('.row');
    if (row) select(view[Number(row.dataset.index)]);
  });

  // ------------------------------------------------------------------ two videos in sync

  const A = $('video-a'), B = $('video-b');
  const other = (v) => (v === A ? B : A);
  const master = () => ((B.duration || 0) > (A.duration || 0) ? B : A); // the longer one leads
  const playing = () => !A.paused || !B.paused;
  let raf = 0;

  function play() {
    const m = master(), o = other(m);
    if (m.ended || (m.duration && m.currentTime >= m.duration)) seek(0);
    const started = [m.play()];
    if (!o.duration || m.currentTime < o.duration) started.push(o.play());
    Promise.all(started).catch(() => {}).then(updateTransport);
    if (!raf) raf = requestAnimationFrame(tick);
  }

  function pause() {
    A.pause();
    B.pause();
    const m = master(), o = other(m);
    if (o.duration && Math.abs(o.currentTime - Math.min(m.currentTime, o.duration)) > 0.001) {
      o.currentTime = Math.min(m.currentTime, o.duration);
    }
    updateTransport();
  }

  function toggle() { if (playing()) pause(); else play(); }

  function seek(t) {
    for (const v of [A, B]) {
      if (v.duration) v.currentTime = Math.max(0, Math.min(t, v.duration));
    }
    updateTransport();
  }

  function tick() {
    raf = 0;
    if (!playing()) { updateTransport(); return; }
    const m = master(), o = other(m);
    if (!o.paused && o.duration && m.currentTime < o.duration && Math.abs(o.currentTime - m.currentTime) > 0.08) {
      o.currentTime = m.currentTime;
    }
    updateTransport();
    raf = requestAnimationFrame(tick);
  }

  function onEnded(ev) {
    const m = master();
    if (ev.target !== m && !(A.ended && B.ended)) return; // the shorter video waits for the longer one
    if ($('loop').checked) { seek(0); play(); } else { pause(); }
  }

  function updateTransport() {
    const m = master();
    const duration = m.duration || 0;
    $('scrub').value = duration ? Math.round(1000 * m.currentTime / duration) : 0;
    $('time').textContent = m.currentTime.toFixed(2) + ' / ' + duration.toFixed(2) + ' s';
    $('play').innerHTML = playing() ? '&#10074;&#10074; pause' : '&#9654; play';
  }

  for (const v of [A, B]) {
    v.addEventListener('ended', onEnded);
    v.addEventListener('loadedmetadata', updateTransport);
    v.addEventListener('error', () => {
      const cap = v === A ? $('role-a') : $('role-b');
      cap.innerHTML += ' <span class="error">cannot play this video' +
        (v.error && v.error.message ? ' (' + escapeHtml(v.error.message) + ')' : '') + '</span>';
    });
  }
  $('play').addEventListener('click', toggle);
  $('scrub').addEventListener('input', () => {
    const at = Number($('scrub').value) / 1000 * (master().duration || 0); // read before pause() redraws it
    pause();
    seek(at);
  });
  $('speed').addEventListener('change', () => { A.playbackRate = B.playbackRate = Number($('speed').value); });

  function srcOf(i) { return SERVED ? 'video/' + i : videos[i].src; }

  // ------------------------------------------------------------------ the shown pair

  function select(p) {
    current = p || null;
    A.pause();
    B.pause();
    if (current) {
      for (const [v, i] of [[A, current.a], [B, current.b]]) {
        v.preload = 'auto';
        v.src = srcOf(i);
        v.playbackRate = Number($('speed').value);
        v.load();
      }
      try { localStorage.setItem(R.storage + ':current', String(current.row)); } catch (err) { /* private mode */ }
      if ($('autoplay').checked) play();
    } else {
      A.removeAttribute('src'); B.removeAttribute('src');
      A.load(); B.load();
    }
    refresh();
    scrollToCurrent();
    renderList();
  }

  function move(step) {
    if (!view.length) return;
    const i = view.indexOf(current);
    const next = i < 0 ? 0 : Math.max(0, Math.min(view.length - 1, i + step));
    if (view[next] !== current) select(view[next]);
  }

  /* After a label: the next pair of the list as it was (a pair that left the filtered list leaves its place). */
  function advance() {
    const before = view.indexOf(current);
    computeView();
    const now = view.indexOf(current);
    if (now >= 0) {
      if (now + 1 < view.length) select(view[now + 1]); else refresh();
    } else if (view.length) {
      select(view[Math.min(Math.max(before, 0), view.length - 1)]);
    } else {
      select(null);
    }
  }

  function renderPair() {
    const p = current;
    const buttons = $('label-buttons');
    if (!p) {
      $('caption').textContent = 'no pair matches the filters';
      $('pair-meta').textContent = '';
      $('role-a').textContent = $('role-b').textContent = '';
      $('scores').innerHTML = '';
      buttons.querySelectorAll('button').forEach((b) => { b.disabled = true; });
      return;
    }
    const e = labels.get(pairKey(p));
    $('caption').textContent = p.prompt;
    const facts = ['pair ' + (view.indexOf(p) + 1) + ' of ' + view.length + ' shown', 'row ' + (p.row + 1) + ' of ' + pairs.length];
    if (KIND === 'pairs') {
      facts.push('gap ' + fmt(p.gap), 'probability ' + fmt(p.probability, 5), 'weight ' + fmt(p.weight, 3),
        p.origin === 'scorer' ? 'chosen by the scorer' : p.origin);
    } else {
      facts.push('tuned: ' + p.run, 'seed ' + p.seed, 'OmniScore tuned \u2212 base ' + fmt(p.gap));
    }
    $('pair-meta').innerHTML = escapeHtml(facts.join(' \u00b7 ')) + (e ? ' \u00b7 label ' + badge(e) : ' \u00b7 unlabelled');
    for (const [cap, i, v] of [[$('role-a'), 0, p.a], [$('role-b'), 1, p.b]]) {
      const seed = videos[v].seed === null || videos[v].seed === undefined ? '' : ' \u00b7 seed ' + videos[v].seed;
      cap.textContent = roleName(p, i) + ' \u00b7 OmniScore ' + fmt(value(v, 'omniscore')) + seed;
      cap.title = videos[v].path;
    }
    buttons.querySelectorAll('button').forEach((b) => {
      const a = ACTIONS[Number(b.dataset.action)];
      b.disabled = false;
      b.classList.toggle('active', !!e && a.label === e.label &&
        (a.label !== 'reject' || e.broken.includes(ROLES[a.role])));
    });
    const head = '<tr><th>dimension</th><th>' + escapeHtml(roleName(p, 0)) + '</th><th>' + escapeHtml(roleName(p, 1)) +
      '</th><th>' + (KIND === 'pairs' ? 'winner \u2212 loser' : 'tuned \u2212 base') + '</th></tr>';
    const rows = R.dimensions.map((d) => {
      const a = value(p.a, d), b = value(p.b, d), g = diff(p, d);
      const ranked = !d.startsWith('raw/') && a !== null && b !== null && a !== b; // higher is better except raw
      const cls = (x, y) => (ranked && x > y ? ' class="better"' : '');
      return '<tr><td>' + escapeHtml(short(d)) + '</td><td' + cls(a, b) + '>' + fmt(a) + '</td><td' + cls(b, a) + '>' +
        fmt(b) + '</td><td class="' + (g > 0 ? 'pos' : g < 0 ? 'neg' : '') + '">' + (g === null ? '\u2013' : (g > 0 ? '+' : '') + fmt(g)) +
        '</td></tr>';
    });
    $('scores').innerHTML = head + rows.join('');
  }

  function renderCounter() {
    $('counter').textContent = 'reviewed ' + labels.size + ' / ' + pairs.length;
  }

  function refresh() {
    renderPair();
    renderList();
    renderCounter();
    if (!$('view-overview').hidden) renderOverview();
  }

  function refilter() {
    computeView();
    if (!view.includes(current)) select(view[0]); else { refresh(); scrollToCurrent(); renderList(); }
  }

  // ------------------------------------------------------------------ overview: plots and agreement

  function humanPick(p) {
    const e = labels.get(pairKey(p));
    if (!e) return null;
    const h = PREFERS[e.label];
    return h === undefined ? null : h;
  }
  function scorerPick(p) {
    if (KIND === 'pairs') return 0;
    const a = value(p.a, 'omniscore'), b = value(p.b, 'omniscore');
    return a === null || b === null || a === b ? null : (a > b ? 0 : 1);
  }
  const pct = (x) => (x === null ? '\u2013' : (100 * x).toFixed(0) + '%');
  const bar = (x) => (x === null ? '' : '<span class="bar" style="width:' + Math.round(60 * x) + 'px"></span>');
  const rate = (k, n) => (n ? k / n : null);

  function renderOverview() {
    const counts = {};
    for (const e of labels.values()) counts[e.label] = (counts[e.label] || 0) + 1;
    const decided = pairs.filter((p) => humanPick(p) !== null && scorerPick(p) !== null);
    const overruled = decided.filter((p) => humanPick(p) !== scorerPick(p));
    let html = '<h2>Labels so far</h2><p>' + labels.size + ' of ' + pairs.length + ' pairs reviewed: ' +
      (R.labels.map((l) => (counts[l] || 0) + ' ' + l).join(', ')) + '.</p>';
    html += '<p>Of ' + decided.length + ' pairs where a person picked a better video, the scorer picked the same in ' +
      (decided.length - overruled.length) + ' and the other in ' + overruled.length +
      (decided.length ? ' (' + pct(overruled.length / decided.length) + ' overruled)' : '') + '.</p>';
    if (KIND === 'eval') html += evalRates();
    html += dimensionTable(decided) + gapTable(decided);
    $('agreement').innerHTML = html;
  }

  function evalRates() {
    let rows = '';
    for (const run of Object.keys(R.runs)) {
      const labelled = pairs.filter((p) => p.run === run && labels.has(pairKey(p)) && labels.get(pairKey(p)).label !== 'reject');
      let human = 0, scorer = 0;
      for (const p of labelled) {
        const l = labels.get(pairKey(p)).label;
        human += l === 'tuned' ? 1 : l === 'tie' ? 0.5 : 0;
        const s = scorerPick(p);
        scorer += s === 1 ? 1 : s === null ? 0.5 : 0;
      }
      const n = labelled.length;
      rows += '<tr><td>' + escapeHtml(run) + '</td><td>' + n + '</td><td>' + bar(rate(human, n)) + pct(rate(human, n)) +
        '</td><td>' + bar(rate(scorer, n)) + pct(rate(scorer, n)) + '</td><td>' + pct(R.runs[run].win_rate) + '</td></tr>';
    }
    return '<h2>Win rate of the tuned model</h2><table id="win-rates"><tr><th>run</th><th>labelled pairs</th>' +
      '<th>people (ties half)</th><th>scorer, same pairs</th><th>scorer, all pairs</th></tr>' + rows + '</table>';
  }

  function dimensionTable(decided) {
    const dims = R.dimensions.filter((d) => !d.startsWith('raw/'));
    let rows = '';
    for (const d of dims) {
      let agree = 0, n = 0, hi = 0, hiFlip = 0, lo = 0, loFlip = 0;
      for (const p of decided) {
        const s = scorerPick(p), h = humanPick(p);
        const vs = value(s === 0 ? p.a : p.b, d), vo = value(s === 0 ? p.b : p.a, d);
        if (vs === null || vo === null || vs === vo) continue;
        const pickHigher = vs > vo;
        n += 1;
        if ((h === s) === pickHigher) agree += 1; // the person chose the video higher on d
        if (pickHigher) { hi += 1; if (h !== s) hiFlip += 1; } else { lo += 1; if (h !== s) loFlip += 1; }
      }
      rows += '<tr><td>' + escapeHtml(short(d)) + '</td><td>' + n + '</td><td>' + bar(rate(agree, n)) + pct(rate(agree, n)) +
        '</td><td>' + pct(rate(hiFlip, hi)) + ' <span class="small">of ' + hi + '</span></td><td>' + pct(rate(loFlip, lo)) +
        ' <span class="small">of ' + lo + '</span></td></tr>';
    }
    return '<h2>Which dimension agrees with people</h2><p class="note">Over the pairs a person decided: how often they ' +
      'picked the video higher on a dimension, and how often they overruled the scorer where its pick is higher or lower ' +
      'on it. A dimension people agree with less than half the time misleads the scorer.</p>' +
      '<table id="dimension-agreement">' +
      '<tr><th>dimension</th><th>pairs</th><th title="how often the person chose the video that is higher on this ' +
      'dimension">person picks the higher</th><th title="overrule rate where the scorer\u2019s pick is higher on this ' +
      'dimension">overruled: pick higher</th><th title="overrule rate where the scorer\u2019s pick is lower on this ' +
      'dimension">overruled: pick lower</th></tr>' +
      rows + '</table>';
  }

  function gapTable(decided) {
    const gaps = pairs.map((p) => Math.abs(p.gap || 0)).sort((x, y) => x - y);
    if (!gaps.length) return '';
    // Quartiles of all pairs' |gap| as cut points (equal ones merged): bins [lo, c1), [c1, c2), ..., [ck, hi].
    const cuts = [...new Set([0.25, 0.5, 0.75].map((q) => gaps[Math.floor(q * (gaps.length - 1))]))]
      .filter((c) => c > gaps[0]);
    const edges = [gaps[0]].concat(cuts, [gaps[gaps.length - 1]]);
    let rows = '';
    for (let i = 0; i + 1 < edges.length; i++) {
      const last = i + 2 === edges.length;
      const inBin = decided.filter((p) => {
        const g = Math.abs(p.gap || 0);
        return g >= edges[i] && (last ? g <= edges[i + 1] : g < edges[i + 1]);
      });
      const flips = inBin.filter((p) => humanPick(p) !== scorerPick(p)).length;
      rows += '<tr><td>' + fmt(edges[i], 3) + (last ? ' \u2013 ' : ' \u2013 &lt;') + fmt(edges[i + 1], 3) + '</td><td>' +
        inBin.length + '</td><td>' + bar(rate(flips, inBin.length)) + pct(rate(flips, inBin.length)) + '</td></tr>';
    }
    return '<h2>Overruled by OmniScore gap</h2><table id="gap-agreement"><tr><th>|OmniScore gap| (quartiles of all ' +
      'pairs)</th><th>decided pairs</th><th>overruled</th></tr>' + rows + '</table>';
  }

  function renderPlots() {
    $('plots').innerHTML = R.plots.map((p) => '<figure><img loading="lazy" src="' + escapeHtml(p.src) + '" alt="' +
      escapeHtml(p.title) + '" title="' + escapeHtml(p.title) + '"></figure>').join('') ||
      '<p class="note">no plots</p>';
  }

  function show(name) {
    $('view-pairs').hidden = name !== 'pairs';
    $('view-overview').hidden = name !== 'overview';
    $('tab-pairs').classList.toggle('active', name === 'pairs');
    $('tab-overview').classList.toggle('active', name === 'overview');
    if (name === 'overview') { pause(); renderOverview(); } else renderList();
  }
  $('tab-pairs').addEventListener('click', () => show('pairs'));
  $('tab-overview').addEventListener('click', () => show('overview'));

  // ------------------------------------------------------------------ export and import

  $('export').addEventListener('click', () => {
    const blob = new Blob([JSON.stringify(documentOf(sortedEntries()), null, 1)], {type: 'application/json'});
    const a = document.createElement('a');
    a.href = URL.createObjectURL(blob);
    a.download = 'labels.json';
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 1000);
  });

  $('import').addEventListener('change', () => {
    const file = $('import').files[0];
    if (!file) return;
    file.text().then((text) => {
      const doc = JSON.parse(text);
      if (!doc || doc.format !== FORMAT || doc.kind !== KIND) {
        throw new Error('not a labels file of a ' + (KIND === 'pairs' ? 'preference dataset' : 'eval report'));
      }
      const found = new Map();
      const skipped = readEntries(doc, found);
      for (const [key, entry] of found) {
        labels.set(key, entry);
        if (SERVED) post({set: entry});
      }
      storeLocal();
      setSaveState('imported ' + found.size + ' label(s) from ' + file.name +
        (skipped ? '; ' + skipped + ' skipped (not a pair of this page, or a video changed)' : ''), skipped > 0);
      refilter();
    }).catch((err) => setSaveState('cannot import ' + file.name + ': ' + err.message, true));
    $('import').value = '';
  });

  // ------------------------------------------------------------------ controls and keys

  const buttons = $('label-buttons');
  ACTIONS.forEach((a, i) => {
    const b = document.createElement('button');
    b.dataset.action = i;
    b.dataset.label = a.label === null ? 'clear' : a.label + (a.role === undefined ? '' : '-' + ROLES[a.role]);
    b.title = a.help + ' (' + a.key + ')';
    b.innerHTML = '<kbd>' + a.key + '</kbd> ' + a.text;
    b.addEventListener('click', () => act(a));
    buttons.appendChild(b);
  });
  $('keys').innerHTML = '<kbd>space</kbd> play/pause both \u00b7 <kbd>\u2190</kbd><kbd>\u2192</kbd> step \u00b7 ' +
    '<kbd>j</kbd>/<kbd>\u2193</kbd> next \u00b7 <kbd>k</kbd>/<kbd>\u2191</kbd> previous \u00b7 ' +
    ACTIONS.map((a) => '<kbd>' + a.key + '</kbd> ' + a.text).join(' \u00b7 ') +
    ' \u00b7 <kbd>/</kbd> search \u00b7 <kbd>o</kbd> overview \u00b7 <kbd>p</kbd> pairs';

  for (const id of ['filter-prompt', 'filter-min', 'filter-max']) $(id).addEventListener('input', refilter);
  for (const id of ['filter-state', 'filter-field', 'sort-field']) $(id).addEventListener('change', refilter);
  $('sort-dir').addEventListener('click', () => {
    descending = !descending;
    $('sort-dir').innerHTML = descending ? '&darr; desc' : '&uarr; asc';
    refilter();
  });
  // A clicked button or box keeps no focus: space and the digits stay the page's keys.
  document.addEventListener('click', (ev) => {
    const t = ev.target.closest('button, input[type=checkbox]');
    if (t) t.blur();
  });
  for (const id of ['speed', 'filter-state', 'filter-field', 'sort-field', 'scrub']) {
    $(id).addEventListener('change', () => $(id).blur());
  }

  document.addEventListener('keydown', (ev) => {
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    const t = ev.target;
    if (t && t.matches && t.matches('input, select, textarea')) {
      if (ev.key === 'Escape') t.blur();
      return;
    }
    const m = master();
    const action = ACTIONS.find((a) => a.key === ev.key);
    if (action && !$('view-pairs').hidden) { act(action); ev.preventDefault(); return; }
    switch (ev.key) {
      case ' ': toggle(); break;
      case 'Backspace': act(ACTIONS[ACTIONS.length - 1]); break;
      case 'ArrowRight': pause(); seek(m.currentTime + 0.1); break;
      case 'ArrowLeft': pause(); seek(m.currentTime - 0.1); break;
      case 'j': case 'ArrowDown': move(1); break;
      case 'k': case 'ArrowUp': move(-1); break;
      case '/': $('filter-prompt').focus(); break;
      case 'o': show('overview'); break;
      case 'p': show('pairs'); break;
      default: return;
    }
    ev.preventDefault();
  });

  // ------------------------------------------------------------------ start

  function start(skipped) {
    renderPlots();
    computeView();
    let first = view[0];
    try {
      const row = Number(localStorage.getItem(R.storage + ':current'));
      if (localStorage.getItem(R.storage + ':current') !== null && pairs[row]) first = pairs[row];
    } catch (err) { /* private mode */ }
    select(first);
    if (skipped) setSaveState(skipped + ' stored label(s) skipped: their videos changed or left this page', true);
  }

  const stored = loadLocal();
  if (!SERVED) {
    labels = stored.local;
    start(stored.skipped);
  } else {
    fetch('api/labels', {cache: 'no-store'}).then((r) => r.json()).then((doc) => {
      const skipped = readEntries(doc, labels);
      // Labels this browser kept that the server lacks (made while it was not running) are sent to it.
      for (const [key, entry] of stored.local) {
        if (!labels.has(key)) { labels.set(key, entry); post({set: entry}); }
      }
      storeLocal();
      start(skipped);
      if (!failed && !skipped) setSaveState('labels are written to disk by the server');
    }).catch((err) => {
      labels = stored.local;
      start(stored.skipped);
      setSaveState('cannot reach the server (' + err.message + '): labels are kept in this browser only', true);
    });
  }
  window.videotunaReview = {labels: () => sortedEntries(), view: () => view.map((p) => p.row),
    current: () => (current ? current.row : null), idle: () => queue};
})();
