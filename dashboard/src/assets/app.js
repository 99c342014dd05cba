// The dualsync dashboard: one hand-written page over the admin JSON API (docs/admin-api.openapi.yaml),
// served from the same origin as the API. No framework, no build step, nothing fetched from
// elsewhere. The bearer token is asked for once and kept in sessionStorage (this tab only); it
// travels in the Authorization header, never in a URL.
'use strict';

const TOKEN_KEY = 'dualsync.token';
const JOB_KEY = 'dualsync.job';
const PAGE_SIZE = 50;
const CATEGORIES = ['application', 'system', 'concurrency'];
const ERROR_STATUSES = ['open', 'retrying', 'dismissed', 'resolved'];
const QUEUES = ['capture', 'sequence', 'deliver.fifo', 'reconcile.fifo'];
// The request limits (DESIGN §1), said before an operator meets them.
const LIMITS = 'A request selects the open errors that match the filter: at most 10,000 of them, ' +
  'at most 5 requests queued per job, and only while the job is active.';

const view = () => document.getElementById('view');
let timer = null;          // the current page's refresh, if it has one
let jobs = [];             // the last /jobs answer

// ---- small DOM helpers -------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'text') el.textContent = v;
    else el.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function svg(tag, attrs, ...children) {
  const el = document.createElementNS('http://www.w3.org/2000/svg', tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

// Replaces what `el` holds; arrays are flattened, and null, undefined and false left out.
function fill(el, ...nodes) {
  el.replaceChildren(...nodes.flat(Infinity).filter((n) => n !== null && n !== undefined && n !== false));
}

function show(...nodes) {
  fill(view(), ...nodes);
}

function notice(text, isError) {
  const n = document.getElementById('notice');
  n.textContent = text || '';
  n.className = isError ? 'error' : '';
  n.hidden = !text;
}

function when(ms) {
  if (ms === undefined || ms === null) return '';
  const d = new Date(ms);
  return d.toLocaleString(undefined, { hour12: false });
}

function statusCell(status, attrs) {
  return h('td', Object.assign({ class: 'status status-' + status }, attrs || {}), status);
}

function key(k) {
  return Array.isArray(k) ? k.join(' / ') : String(k);
}

// ---- the API ----------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(method, path, body) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const headers = { Authorization: 'Bearer ' + token };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  let res;
  try {
    res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (e) {
    throw new ApiError(0, 'the dashboard\'s server did not answer (is dualsync still running?)');
  }
  const text = await res.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = null; }
  if (res.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY);
    login((data && data.error) || 'the token was refused');
    throw new ApiError(401, 'not logged in');
  }
  if (!res.ok) throw new ApiError(res.status, (data && data.error) || (res.status + ' ' + res.statusText));
  return data;
}

function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null && v !== '') q.set(k, v);
  const s = q.toString();
  return s ? '?' + s : '';
}

const enc = encodeURIComponent;
const job = () => sessionStorage.getItem(JOB_KEY);

// ---- log in -----------------------------------------------------------------------------

function login(message) {
  stopTimer();
  for (const id of ['nav', 'job-pick', 'logout']) document.getElementById(id).hidden = true;
  notice('');
  const input = h('input', { id: 'token', type: 'password', autocomplete: 'off', placeholder: 'token' });
  const form = h('form', { class: 'card login', id: 'login-form', onsubmit: async (e) => {
    e.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, input.value.trim());
    try {
      await loadJobs();
      route();
    } catch (err) {
      if (err.status !== 401) notice(err.message, true);
    }
  } },
  h('h2', {}, 'Log in'),
  h('p', { class: 'muted' }, 'The admin token: for `dualsync run`, the file admin-token in its data folder ' +
    '(or DUALSYNC_ADMIN_TOKEN); for `dualsync dashboard`, the token it printed.'),
  message ? h('p', { class: 'bad', id: 'login-error' }, message) : null,
  input,
  h('button', { id: 'login', class: 'primary', type: 'submit' }, 'Log in'));
  show(form);
  input.focus();
}

async function loadJobs() {
  jobs = await api('GET', '/jobs');
  const select = document.getElementById('job-select');
  if (!jobs.some((j) => j.job === job()) && jobs.length) sessionStorage.setItem(JOB_KEY, jobs[0].job);
  select.replaceChildren(...jobs.map((j) => h('option', { value: j.job, selected: j.job === job() }, j.job)));
  for (const id of ['nav', 'job-pick', 'logout']) document.getElementById(id).hidden = false;
}

// ---- routing ----------------------------------------------------------------------------

const PAGES = {
  jobs: jobsPage,
  errors: errorsPage,
  requests: requestsPage,
  conflicts: conflictsPage,
  'dead-letters': deadLettersPage,
  charts: chartsPage,
};

function stopTimer() {
  if (timer) clearInterval(timer);
  timer = null;
}

function every(ms, fn) {
  stopTimer();
  timer = setInterval(() => fn().catch(() => {}), ms);
}

function route() {
  if (!sessionStorage.getItem(TOKEN_KEY)) return login();
  stopTimer();
  notice('');
  const name = (location.hash || '#jobs').slice(1);
  for (const a of document.querySelectorAll('#nav a')) a.classList.toggle('current', a.getAttribute('href') === '#' + name);
  const page = PAGES[name] || jobsPage;
  page().catch((e) => { if (e.status !== 401) notice(e.message, true); });
}

// ---- jobs -------------------------------------------------------------------------------

const ACTIONS = {
  start: ['stopped'],
  stop: ['active', 'paused', 'starting', 'resuming'],
  pause: ['active'],
  resume: ['paused', 'resuming'],
};

async function lag(name) {
  // The metrics of the last 15 minutes, where the backend has them (GET /jobs/{job}/metrics).
  try {
    const m = await api('GET', '/jobs/' + enc(name) + '/metrics' + query({ since: Date.now() - 15 * 60000 }));
    const last = (m.minutes || []).filter((x) => x.delivered > 0).pop();
    if (!last) return 'nothing delivered in 15 min';
    // The API gives the upper bounds of the lag's histogram buckets.
    return 'p50 ≤ ' + seconds(last.lag_ms_p50) + ', max ≤ ' + seconds(last.lag_ms_max) + ' (minute of ' +
      new Date(last.at_ms).toLocaleTimeString(undefined, { hour12: false }) + ')';
  } catch (e) {
    if (e.status === 401) throw e;
    return 'no metrics on this backend';
  }
}

function seconds(ms) {
  return ms < 1000 ? ms + ' ms' : (ms / 1000).toFixed(1) + ' s';
}

async function jobsPage() {
  await loadJobs();
  showJobs(await Promise.all(jobs.map((j) => lag(j.job))));
  every(3000, jobsPageRefresh);
}

// The jobs, then the pipeline's queues: every job view carries the same queues (they are
// shared by all jobs), so they are shown once, from the first.
function showJobs(lags) {
  if (!jobs.length) {
    return show(h('h2', {}, 'Jobs'), h('p', { class: 'muted' }, 'No jobs yet: apply one with `dualsync job apply FILE`.'));
  }
  show(h('h2', {}, 'Jobs'), jobs.map((j, i) => jobCard(j, lags[i])), queuesCard(jobs[0].pipeline_queues || []));
}

function depthText(r) {
  return 'error' in r ? 'unreadable: ' + r.error : r.visible + ' visible / ' + r.in_flight + ' in flight';
}

function depthCell(r, attr, step) {
  return h('td', { [attr]: step, class: 'error' in r ? 'bad' : null, title: r.queue }, depthText(r));
}

function queuesCard(queues) {
  return h('section', { class: 'card', id: 'pipeline-queues' },
    h('h3', {}, 'Pipeline queues (shared by every job)'),
    h('p', { class: 'muted' }, 'What each step has still to handle, for all jobs together: visible = waiting, ' +
      'in flight = being handled or waiting for a retry. Dead letters are messages a step gave up on.'),
    h('table', {}, h('tr', {}, h('th', {}, 'Step'), h('th', {}, 'Queue'), h('th', {}, 'Dead letters')),
      queues.map((q) => h('tr', {}, h('td', {}, q.step),
        depthCell(q.queue, 'data-queue-depth', q.step), depthCell(q.dead_letter, 'data-dead-letter-depth', q.step)))));
}

function jobCard(j, lagText) {
  const buttons = Object.entries(ACTIONS).map(([action, from]) =>
    h('button', { type: 'button', 'data-action': action, 'data-job': j.job, disabled: !from.includes(j.status),
      onclick: () => act(j.job, action) }, action));
  const byCat = CATEGORIES.map((c) => h('span', { 'data-count': c }, c + ': ' + (j.errors.by_category[c] || 0)));
  const groups = j.table_groups.map((g, gi) => h('tr', {},
    h('td', {}, (gi + 1) + '. ' + g.name),
    h('td', {}, g.maps.map((m) => h('div', {}, m.sequence + ' · ' + m.name + ' ',
      h('span', { class: 'muted' }, '(' + j.apps.map((a) => a.name + ': ' + (m.entities[a.name] || '?')).join(', ') + ')'))))));
  return h('section', { class: 'card', 'data-job-card': j.job },
    h('h3', {}, j.job, ' ', h('span', { class: 'status status-' + j.status, 'data-job-status': j.job }, j.status)),
    j.paused_reason ? h('p', { class: 'muted' }, 'Paused: ' + j.paused_reason) : null,
    h('p', { class: 'actions' }, buttons),
    h('dl', { class: 'detail' },
      h('dt', {}, 'Apps'), h('dd', {}, j.apps.map((a) => a.name + ' (' + a.connector + ')').join(' ↔ '), ', primary ', h('strong', {}, j.primary)),
      h('dt', {}, 'Errors'), h('dd', { class: 'counts' }, byCat, h('span', { class: 'muted' }, 'open: ' + (j.errors.by_status.open || 0) + ' of ' + j.errors.total)),
      h('dt', {}, 'Queued'), h('dd', {}, j.requests_queued + ' request(s); ' +
        (j.kept_deliveries >= 100 ? '100 or more' : j.kept_deliveries) + ' delivery(ies) kept until the job is active'),
      h('dt', {}, 'Delivery lag'), h('dd', { 'data-lag': j.job }, lagText),
      j.alert ? [h('dt', {}, 'Alert rule'), h('dd', {}, 'pause after ' + j.alert.application_errors + ' application errors in ' + j.alert.minutes + ' min')] : null),
    h('h3', {}, 'Table groups (delivered in this order; maps by sequence)'),
    h('table', {}, h('tr', {}, h('th', {}, 'Group'), h('th', {}, 'Maps')), groups));
}

async function act(name, action) {
  try {
    const answer = await api('POST', '/jobs/' + enc(name) + '/' + action);
    const handed = answer && answer.handed_back;
    notice('Job ' + name + ': ' + action + ' done' + (handed ? '; ' + handed + ' kept deliveries went back to delivery' : '') + '.');
    await jobsPageRefresh();
  } catch (e) {
    if (e.status !== 401) notice('Refused: ' + e.message, true);
  }
}

async function jobsPageRefresh() {
  if ((location.hash || '#jobs') !== '#jobs') return;
  await loadJobs();
  const lags = await Promise.all(jobs.map((j) => lag(j.job)));
  if ((location.hash || '#jobs') === '#jobs') showJobs(lags);
}

// ---- sync errors ------------------------------------------------------------------------

const errorsState = { filter: {}, cursors: [null], page: 0 };

function currentJob() {
  const j = jobs.find((x) => x.job === job());
  if (!j) throw new ApiError(404, 'no job to show: apply one first');
  return j;
}

function toMs(value) {
  return value ? String(new Date(value).getTime()) : undefined;
}

function localInput(ms) {
  if (!ms) return '';
  const d = new Date(Number(ms));
  const pad = (n) => String(n).padStart(2, '0');
  return d.getFullYear() + '-' + pad(d.getMonth() + 1) + '-' + pad(d.getDate()) + 'T' + pad(d.getHours()) + ':' + pad(d.getMinutes());
}

async function errorsPage() {
  const j = currentJob();
  const f = errorsState.filter;
  const entities = [...new Set(j.table_groups.flatMap((g) => g.maps.map((m) => m.name)))];
  const select = (id, name, values, current) => h('select', { id, name },
    h('option', { value: '' }, 'any'), values.map((v) => h('option', { value: v, selected: v === current }, v)));
  const form = h('form', { class: 'filters', id: 'error-filters', onsubmit: (e) => {
    e.preventDefault();
    const data = new FormData(form);
    errorsState.filter = {
      from_ms: toMs(data.get('from')), to_ms: toMs(data.get('to')),
      entity: data.get('entity') || undefined, app: data.get('app') || undefined,
      category: data.get('category') || undefined, status: data.get('status') || undefined,
    };
    errorsState.cursors = [null];
    errorsState.page = 0;
    errorsPage().catch((err) => notice(err.message, true));
  } },
  h('label', {}, 'From', h('input', { id: 'f-from', name: 'from', type: 'datetime-local', value: localInput(f.from_ms) })),
  h('label', {}, 'To', h('input', { id: 'f-to', name: 'to', type: 'datetime-local', value: localInput(f.to_ms) })),
  h('label', {}, 'Entity (map)', select('f-entity', 'entity', entities, f.entity)),
  h('label', {}, 'Data source', select('f-app', 'app', j.apps.map((a) => a.name), f.app)),
  h('label', {}, 'Category', select('f-category', 'category', CATEGORIES, f.category)),
  h('label', {}, 'Status', select('f-status', 'status', ERROR_STATUSES, f.status)),
  h('button', { id: 'f-apply', class: 'primary', type: 'submit' }, 'Filter'));

  const after = errorsState.cursors[errorsState.page];
  const [page, counts] = await Promise.all([
    api('GET', '/jobs/' + enc(j.job) + '/errors' + query(Object.assign({}, f, { limit: PAGE_SIZE, after }))),
    api('GET', '/jobs/' + enc(j.job) + '/errors/counts' + query(f)),
  ]);
  const detail = h('div', { id: 'error-detail' });
  const rows = page.items.map((e) => h('tr', { class: 'clickable', 'data-error': e.id, onclick: (ev) => {
    for (const r of document.querySelectorAll('tr.chosen')) r.classList.remove('chosen');
    ev.currentTarget.classList.add('chosen');
    errorDetail(j.job, e.id, detail);
  } },
  h('td', {}, when(e.last_seen_ms)), h('td', {}, e.map), h('td', {}, e.app), h('td', {}, key(e.key)),
  h('td', {}, e.category), statusCell(e.status), h('td', {}, e.attempts), h('td', {}, e.message)));
  const pager = h('div', { class: 'pager' },
    h('button', { id: 'page-prev', type: 'button', disabled: errorsState.page === 0, onclick: () => {
      errorsState.page -= 1; errorsPage().catch((e) => notice(e.message, true));
    } }, '← Previous'),
    h('span', { class: 'muted' }, 'page ' + (errorsState.page + 1)),
    h('button', { id: 'page-next', type: 'button', disabled: !page.next, onclick: () => {
      errorsState.cursors[errorsState.page + 1] = page.next;
      errorsState.page += 1;
      errorsPage().catch((e) => notice(e.message, true));
    } }, 'Next →'));
  const selection = h('div', { id: 'selection', class: 'card' },
    h('p', {}, h('strong', { id: 'match-count' }, counts.total + ' rows match'), ' ',
      h('span', { class: 'muted' }, CATEGORIES.map((c) => c + ': ' + (counts.by_category[c] || 0)).join(', ') + '; ' +
        ERROR_STATUSES.map((s) => s + ': ' + (counts.by_status[s] || 0)).join(', '))),
    h('p', { class: 'actions' },
      h('button', { id: 'retry-selection', type: 'button', onclick: () => prepare(j.job, 'retry') }, 'Retry what the filter selects…'),
      h('button', { id: 'dismiss-selection', type: 'button', class: 'danger', onclick: () => prepare(j.job, 'dismiss') }, 'Dismiss what the filter selects…')),
    h('div', { id: 'request-panel' }));
  show(h('h2', {}, 'Sync errors of ' + j.job), form, selection,
    // The filter this page shows, for whoever needs to tell one rendering from the next.
    h('table', { id: 'errors-table', 'data-query': query(f) + '#' + errorsState.page },
      h('tr', {}, ['Last seen', 'Map', 'Data source', 'Key', 'Category', 'Status', 'Attempts', 'Message'].map((t) => h('th', {}, t))),
      rows.length ? rows : h('tr', {}, h('td', { colspan: 8, class: 'muted' }, 'No error rows match.'))),
    pager, detail);
}

async function errorDetail(name, id, into) {
  const e = await api('GET', '/jobs/' + enc(name) + '/errors/' + enc(id));
  const fields = [['Id', e.id], ['Map', e.map], ['Entity', e.entity], ['Data source', e.app + ' (side ' + e.source + ')'],
    ['Key', key(e.key)], ['Change seq', e.seq], ['Transaction', e.txid], ['Category', e.category],
    ['Retriable', e.retriable ? 'yes' : 'no'], ['Attempts', e.attempts], ['First seen', when(e.first_seen_ms)],
    ['Last seen', when(e.last_seen_ms)], ['Status', e.status], ['Request', e.request || '—'], ['Message', e.message]];
  into.replaceChildren(h('section', { class: 'card' }, h('h3', {}, 'Error ' + e.id),
    h('dl', { class: 'detail' }, fields.map(([k, v]) => [h('dt', {}, k), h('dd', {}, String(v))]))));
}

// Shows how many rows a request would take before it is made, and the limits in plain words.
async function prepare(name, action) {
  const panel = document.getElementById('request-panel');
  const filter = Object.assign({}, errorsState.filter, { status: 'open' });
  const counts = await api('GET', '/jobs/' + enc(name) + '/errors/counts' + query(filter));
  const n = counts.total;
  const j = jobs.find((x) => x.job === name);
  const problems = [];
  if (n === 0) problems.push('No open errors match the filter: there is nothing to ' + action + '.');
  if (n > 10000) problems.push('The filter selects ' + n + ' open errors; a request takes at most 10,000. Narrow it by time range, entity, data source or category.');
  if (j && j.status !== 'active') problems.push('The job is ' + j.status + ': requests are taken only while it is active.');
  if (j && j.requests_queued >= 5) problems.push('The job already has 5 requests queued: wait for one to finish.');
  const verb = action === 'retry' ? 'Retry' : 'Dismiss';
  fill(panel,
    h('p', { id: 'request-preview' }, verb + ' selects ' + n + ' open error' + (n === 1 ? '' : 's') +
      (errorsState.filter.status && errorsState.filter.status !== 'open' ? ' (a request takes open rows only, whatever the status filter)' : '') + '.'),
    h('p', { class: 'muted' }, LIMITS + (action === 'dismiss' ? ' A dismissed row is never retried.' : '')),
    problems.length ? h('ul', { class: 'bad', id: 'request-problems' }, problems.map((p) => h('li', {}, p))) : null,
    h('p', { class: 'actions' },
      h('button', { id: 'confirm-request', class: 'primary', type: 'button', onclick: () => submit(name, action) }, verb + ' ' + n),
      h('button', { type: 'button', onclick: () => panel.replaceChildren() }, 'Cancel')));
}

async function submit(name, action) {
  const panel = document.getElementById('request-panel');
  const filter = {};
  for (const [k, v] of Object.entries(errorsState.filter)) {
    if (v === undefined) continue;
    filter[k] = k.endsWith('_ms') ? Number(v) : v;
  }
  try {
    const r = await api('POST', '/jobs/' + enc(name) + '/requests', { action, filter });
    panel.replaceChildren(h('p', { id: 'request-result', class: 'ok' }, 'Request ' + r.id + ' queued: ' +
      r.progress.selected + ' rows. ', h('a', { href: '#requests' }, 'Follow it on the Requests page.')));
  } catch (e) {
    if (e.status === 401) return;
    panel.replaceChildren(h('p', { id: 'request-result', class: 'bad' }, 'Refused: ' + e.message));
  }
}

// ---- requests ---------------------------------------------------------------------------

async function requestsPage() {
  const j = currentJob();
  const draw = async () => {
    const list = await api('GET', '/jobs/' + enc(j.job) + '/requests');
    // The list has the stored progress; a request still running is read one by one for its live progress.
    const live = await Promise.all(list.map((r) => (r.settled ? r : api('GET', '/jobs/' + enc(j.job) + '/requests/' + enc(r.id)))));
    const rows = live.slice().reverse().map((r) => {
      const p = r.progress;
      // Rows that cannot be retried (concurrency skips) are left as they are: they count as handled.
      const handled = Math.min(p.selected, p.done + p.not_retriable);
      const share = p.selected ? Math.round((100 * handled) / p.selected) : 100;
      const fill = h('i', {});
      fill.style.width = share + '%';
      return h('tr', { 'data-request': r.id },
        h('td', {}, r.id), h('td', {}, r.action), h('td', {}, when(r.created_ms)),
        statusCell(r.status, { 'data-request-status': r.id }),
        h('td', { class: 'progress' }, h('span', { class: 'bar' }, fill), ' ', handled + ' / ' + p.selected),
        h('td', { 'data-succeeded': r.id }, p.succeeded), h('td', {}, p.still_failing), h('td', {}, p.not_retriable),
        h('td', { 'data-settled': r.id }, r.settled ? 'final' : 'in progress'),
        h('td', {}, r.reason || describe(r.filter)));
    });
    show(h('h2', {}, 'Requests of ' + j.job),
      h('p', { class: 'muted' }, LIMITS),
      h('table', { id: 'requests-table' },
        h('tr', {}, ['Id', 'Action', 'Created', 'Status', 'Progress', 'Succeeded', 'Still failing', 'Not retriable', 'Outcome', 'Filter or reason'].map((t) => h('th', {}, t))),
        rows.length ? rows : h('tr', {}, h('td', { colspan: 10, class: 'muted' }, 'No requests yet: make one from the Sync errors page.'))));
    return live.some((r) => !r.settled);
  };
  await draw();
  every(1000, async () => { if (location.hash === '#requests') await draw(); });
}

function describe(filter) {
  const parts = Object.entries(filter || {}).map(([k, v]) => (k.endsWith('_ms') ? k + ' ' + when(v) : k + ' ' + v));
  return parts.length ? parts.join(', ') : 'every open error';
}

// ---- conflicts --------------------------------------------------------------------------

const conflictsState = { cursors: [null], page: 0 };

async function conflictsPage() {
  const j = currentJob();
  const after = conflictsState.cursors[conflictsState.page];
  const page = await api('GET', '/jobs/' + enc(j.job) + '/conflicts' + query({ limit: PAGE_SIZE, after }));
  const rows = page.items.map((c) => h('tr', {},
    h('td', {}, when(c.at_ms)), h('td', {}, c.map), h('td', {}, key(c.key)), h('td', {}, c.app),
    h('td', { class: 'ok' }, c.winner), h('td', { class: 'muted' }, c.hashes.map((x) => String(x).slice(0, 10)).join(' / '))));
  show(h('h2', {}, 'Conflicts of ' + j.job),
    h('p', { class: 'muted' }, 'A record changed on both sides since its last sync: the primary (' + j.primary + ') wins and its version is written to the other side.'),
    h('table', { id: 'conflicts-table' },
      h('tr', {}, ['Seen', 'Map', 'Key', 'Change being delivered from', 'Won', 'Content hashes (side A / B)'].map((t) => h('th', {}, t))),
      rows.length ? rows : h('tr', {}, h('td', { colspan: 6, class: 'muted' }, 'No conflicts.'))),
    h('div', { class: 'pager' },
      h('button', { type: 'button', disabled: conflictsState.page === 0, onclick: () => { conflictsState.page -= 1; route(); } }, '← Previous'),
      h('button', { type: 'button', disabled: !page.next, onclick: () => {
        conflictsState.cursors[conflictsState.page + 1] = page.next; conflictsState.page += 1; route();
      } }, 'Next →')));
}

// ---- dead letters -----------------------------------------------------------------------

const deadState = { queue: '', cursors: [null], page: 0 };

async function deadLettersPage() {
  const after = deadState.cursors[deadState.page];
  const page = await api('GET', '/dead-letters' + query({ queue: deadState.queue, limit: PAGE_SIZE, after }));
  const detail = h('div', { id: 'dead-letter-detail' });
  const picker = h('select', { id: 'dl-queue', onchange: (e) => {
    deadState.queue = e.target.value; deadState.cursors = [null]; deadState.page = 0; route();
  } }, h('option', { value: '' }, 'every queue'), QUEUES.map((q) => h('option', { value: q, selected: q === deadState.queue }, q)));
  const rows = page.items.map((d) => h('tr', { class: 'clickable', onclick: () => {
    detail.replaceChildren(h('section', { class: 'card' }, h('h3', {}, d.queue + ' / ' + d.message_id),
      h('p', {}, d.reason), h('pre', {}, d.body)));
  } },
  h('td', {}, when(d.at_ms)), h('td', {}, d.queue), h('td', {}, d.message_id), h('td', {}, d.job || '—'),
  h('td', {}, d.receive_count), h('td', {}, d.reason), statusCell(d.status),
  h('td', {}, d.status === 'dead' ? h('button', { type: 'button', onclick: (e) => {
    e.stopPropagation(); redrive(d.queue, { message_id: d.message_id });
  } }, 'Redrive') : when(d.redriven_ms))));
  const bulk = deadState.queue ? h('p', { class: 'actions' },
    job() ? h('button', { type: 'button', onclick: () => redrive(deadState.queue, { job: job() }) }, 'Redrive job ' + job() + ' in ' + deadState.queue) : null,
    h('button', { type: 'button', onclick: () => redrive(deadState.queue, { all: true }) }, 'Redrive all of ' + deadState.queue)) : null;
  show(h('h2', {}, 'Dead letters'),
    h('p', { class: 'muted' }, 'Messages a step could not handle within 5 receives, newest first. A redriven message goes back to its queue; if it fails again it comes back under a new id.'),
    h('p', {}, 'Queue ', picker), bulk,
    h('table', { id: 'dead-letters-table' },
      h('tr', {}, ['Seen', 'Queue', 'Message', 'Job', 'Receives', 'Reason', 'Status', ''].map((t) => h('th', {}, t))),
      rows.length ? rows : h('tr', {}, h('td', { colspan: 8, class: 'muted' }, 'No dead letters.'))),
    h('div', { class: 'pager' },
      h('button', { type: 'button', disabled: deadState.page === 0, onclick: () => { deadState.page -= 1; route(); } }, '← Previous'),
      h('button', { type: 'button', disabled: !page.next, onclick: () => {
        deadState.cursors[deadState.page + 1] = page.next; deadState.page += 1; route();
      } }, 'Next →')),
    detail);
}

async function redrive(queue, which) {
  try {
    const r = await api('POST', '/dead-letters/' + enc(queue) + '/redrive', which);
    await deadLettersPage();
    notice('Redrove ' + r.redriven.length + ' message(s) to ' + r.queue + (r.more ? '; more are left: redrive again' : '') + '.');
  } catch (e) {
    if (e.status !== 401) notice('Refused: ' + e.message, true);
  }
}

// ---- charts -----------------------------------------------------------------------------

const COLORS = { application: '#d1495b', system: '#edae49', concurrency: '#66a182', conflict: '#8d6cab',
  delivered: '#1f5fbf', p50: '#1f5fbf', max: '#d1495b' };

async function chartsPage() {
  const j = currentJob();
  const hours = Number(sessionStorage.getItem('dualsync.hours') || 1);
  const picker = h('select', { id: 'chart-hours', onchange: (e) => { sessionStorage.setItem('dualsync.hours', e.target.value); route(); } },
    [0.25, 1, 3, 12, 24].map((n) => h('option', { value: n, selected: n === hours }, n < 1 ? 'last ' + n * 60 + ' min' : 'last ' + n + ' h')));
  let m;
  const span = { from: Date.now() - hours * 3600000, to: Date.now() };
  try {
    m = await api('GET', '/jobs/' + enc(j.job) + '/metrics' + query({ since: span.from }));
  } catch (e) {
    if (e.status === 404 && /no route/.test(e.message)) {
      show(h('h2', {}, 'Charts of ' + j.job), h('p', { class: 'muted' }, 'This backend serves no metrics.'));
      return;
    }
    throw e;
  }
  const minutes = m.minutes || [];
  const totals = m.totals || {};
  const errs = totals.errors || {};
  show(h('h2', {}, 'Charts of ' + j.job, ' ', picker),
    h('p', { class: 'counts', id: 'metric-totals' },
      h('span', {}, 'delivered: ' + (totals.delivered || 0)), h('span', {}, 'conflicts: ' + (totals.conflicts || 0)),
      h('span', {}, 'dead letters: ' + (totals.dead_letters || 0)), h('span', {}, 'throttle waits: ' + (totals.throttle_waits || 0)),
      CATEGORIES.map((c) => h('span', {}, c + ' errors: ' + (errs[c] || 0)))),
    h('div', { class: 'charts' },
      h('h3', {}, 'Errors per minute, by category'),
      legend(CATEGORIES.concat(['conflict'])),
      stacked(span, minutes, CATEGORIES.concat(['conflict']), (x, c) => (c === 'conflict' ? x.conflicts : (x.errors || {})[c]) || 0, 'errors-chart'),
      h('h3', {}, 'Records synced per minute'),
      stacked(span, minutes, ['delivered'], (x) => x.delivered || 0, 'delivered-chart'),
      h('h3', {}, 'Delivery lag (from the change to its delivery)'),
      legend(['p50', 'max']),
      lines(span, minutes.filter((x) => x.delivered > 0), [['p50', (x) => x.lag_ms_p50], ['max', (x) => x.lag_ms_max]], 'lag-chart')));
  every(15000, async () => { if (location.hash === '#charts') await chartsPage(); });
}

function legend(names) {
  return h('p', { class: 'legend' }, names.map((n) => h('span', {}, h('i', { class: 'swatch-' + n }), n)));
}

const W = 900, H = 180, PAD = 48;
const MINUTE = 60000;

// The x of a time in the span (minutes with nothing counted are left out by the API: the
// axis is time, not the list).
function xOf(span, ms) {
  return PAD + ((W - PAD - 10) * (ms - span.from)) / Math.max(1, span.to - span.from);
}

function frame(id, span, maxY, empty, unit) {
  const g = svg('svg', { id, width: W, height: H + 30, viewBox: '0 0 ' + W + ' ' + (H + 30), role: 'img' });
  g.append(svg('line', { x1: PAD, y1: H, x2: W - 10, y2: H, stroke: '#999' }));
  g.append(svg('line', { x1: PAD, y1: 10, x2: PAD, y2: H, stroke: '#999' }));
  g.append(svg('text', { x: PAD - 4, y: 16, 'text-anchor': 'end', 'font-size': 11 }, fmt(maxY, unit)));
  g.append(svg('text', { x: PAD - 4, y: H, 'text-anchor': 'end', 'font-size': 11 }, '0'));
  const t = (ms) => new Date(ms).toLocaleTimeString(undefined, { hour12: false, hour: '2-digit', minute: '2-digit' });
  g.append(svg('text', { x: PAD, y: H + 16, 'font-size': 11 }, t(span.from)));
  g.append(svg('text', { x: W - 10, y: H + 16, 'text-anchor': 'end', 'font-size': 11 }, t(span.to)));
  if (empty) g.append(svg('text', { x: W / 2, y: H / 2, 'text-anchor': 'middle', fill: '#777' }, 'nothing in this period'));
  return g;
}

function fmt(v, unit) {
  return unit === 'ms' ? seconds(v) : String(v);
}

// One bar per minute at its time, the series stacked.
function stacked(span, minutes, series, value, id) {
  const totals = minutes.map((x) => series.reduce((s, c) => s + value(x, c), 0));
  const maxY = Math.max(1, ...totals);
  const g = frame(id, span, maxY, !totals.some((n) => n > 0));
  const width = Math.max(1, xOf(span, span.from + MINUTE) - xOf(span, span.from) - 1);
  for (const x of minutes) {
    let y = H;
    for (const c of series) {
      const v = value(x, c);
      if (!v) continue;
      const hgt = ((H - 10) * v) / maxY;
      y -= hgt;
      g.append(svg('rect', { x: xOf(span, x.at_ms).toFixed(1), y: y.toFixed(1), width: width.toFixed(1), height: hgt.toFixed(1), fill: COLORS[c] },
        svg('title', {}, new Date(x.at_ms).toLocaleTimeString(undefined, { hour12: false }) + ' ' + c + ': ' + v)));
    }
  }
  return g;
}

// A line per series through the minutes that have a value, a dot on each.
function lines(span, minutes, series, id) {
  const maxY = Math.max(1, ...minutes.flatMap((x) => series.map(([, f]) => f(x) || 0)));
  const g = frame(id, span, maxY, minutes.length === 0, 'ms');
  for (const [name, f] of series) {
    const pts = minutes.filter((x) => f(x) !== undefined)
      .map((x) => [xOf(span, x.at_ms + MINUTE / 2), H - ((H - 10) * f(x)) / maxY, x, f(x)]);
    if (pts.length > 1) g.append(svg('polyline', { points: pts.map(([px, py]) => px.toFixed(1) + ',' + py.toFixed(1)).join(' '), fill: 'none', stroke: COLORS[name], 'stroke-width': 2 }));
    for (const [px, py, x, v] of pts) {
      g.append(svg('circle', { cx: px.toFixed(1), cy: py.toFixed(1), r: 2.5, fill: COLORS[name] },
        svg('title', {}, new Date(x.at_ms).toLocaleTimeString(undefined, { hour12: false }) + ' ' + name + ': ' + seconds(v))));
    }
  }
  return g;
}

// ---- start ------------------------------------------------------------------------------

document.addEventListener('DOMContentLoaded', () => {
  document.getElementById('job-select').addEventListener('change', (e) => {
    sessionStorage.setItem(JOB_KEY, e.target.value);
    errorsState.filter = {}; errorsState.cursors = [null]; errorsState.page = 0;
    conflictsState.cursors = [null]; conflictsState.page = 0;
    route();
  });
  document.getElementById('logout').addEventListener('click', () => {
    sessionStorage.removeItem(TOKEN_KEY);
    login();
  });
  window.addEventListener('hashchange', route);
  if (!sessionStorage.getItem(TOKEN_KEY)) return login();
  loadJobs().then(route, (e) => { if (e.status !== 401) notice(e.message, true); });
});
