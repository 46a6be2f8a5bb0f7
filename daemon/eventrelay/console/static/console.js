// eventrelay's console: a page of the daemon that reads and acts through its admin API. No framework and no
// third-party code; every node is built with textContent (never innerHTML), so nothing a producer sent in an
// event can run here.

const SVG = 'http://www.w3.org/2000/svg';
const $ = (selector, root = document) => root.querySelector(selector);

function el(tag, attrs = {}, ...children) {
  const svg = tag.startsWith('svg:');
  const node = svg ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? '' : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

// -- the admin API ----------------------------------------------------------------------------------------

let session = { login: false, csrf: null, csrf_header: 'X-CSRF-Token' };

async function api(path, { method = 'GET', body } = {}) {
  const headers = { Accept: 'application/json' };
  if (method !== 'GET') {
    headers['Content-Type'] = 'application/json';
    if (session.csrf) headers[session.csrf_header] = session.csrf;
  }
  const response = await fetch(path, {
    method, headers, credentials: 'same-origin', body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (response.status === 401) {
    location.assign('/ui/'); // the session ended: back to the login form
    throw new Error('the session ended: log in again');
  }
  const json = (response.headers.get('Content-Type') || '').includes('json') ? await response.json() : null;
  if (!response.ok) {
    const error = new Error((json && json.errors || []).map((e) => e.detail).join('; ')
      || `${response.status} ${response.statusText}`);
    error.status = response.status;
    error.document = json;
    throw error;
  }
  return json;
}

const enc = encodeURIComponent;

// Replace a node's children (arrays flattened, nothing for null or false).
function show(node, ...children) {
  node.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false));
}

// -- small views ------------------------------------------------------------------------------------------

function pad(n) { return String(n).padStart(2, '0'); }

function localTime(date) {
  return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())} `
    + `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}`;
}

function ago(date) {
  const s = Math.round((Date.now() - date.getTime()) / 1000);
  if (s < 0) return `in ${duration(-s)}`;
  return `${duration(s)} ago`;
}

function duration(s) {
  if (s < 90) return `${s} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  if (s < 129600) return `${Math.round(s / 3600)} h`;
  return `${Math.round(s / 86400)} d`;
}

function when(iso) {
  if (!iso) return el('span', { class: 'muted' }, '—');
  const date = new Date(iso);
  return el('time', { datetime: iso, title: iso }, localTime(date), ' ', el('span', { class: 'muted' }, `(${ago(date)})`));
}

function ms(seconds) {
  if (seconds === null || seconds === undefined) return '—';
  return seconds < 1 ? `${Math.round(seconds * 1000)} ms` : `${seconds.toFixed(2)} s`;
}

// A status count: counted up to 100,000 (counts_capped), then shown as "100,000+".
function count(n, row) { return row.counts_capped && n >= 100000 ? `${num(n)}+` : num(n); }

function num(n) { return n === null || n === undefined ? '—' : n.toLocaleString('en'); }

function badge(text, kind = text) { return el('span', { class: `badge ${kind}` }, text); }

function flash(text, error = false) {
  const box = $('#flash');
  const line = el('p', { class: error ? 'error' : 'note' }, text);
  show(box, line);
  setTimeout(() => line.remove(), error ? 15000 : 6000);
}

function confirmAction(text) {
  const dialog = $('#confirm');
  $('#confirm-text').textContent = text;
  dialog.returnValue = '';
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener('close', () => resolve(dialog.returnValue === 'ok'), { once: true });
  });
}

// An action button: asks for confirmation, calls the API, says what happened, then refreshes the view.
function action(id, label, question, call, after) {
  const button = el('button', { id, type: 'button' }, label);
  button.addEventListener('click', async () => {
    if (!(await confirmAction(question))) return;
    button.disabled = true;
    try {
      flash(await call());
      if (after) await after();
    } catch (error) {
      flash(error.message, true);
    } finally {
      button.disabled = false;
    }
  });
  return button;
}

function sending(meta) {
  return meta && meta.held_by ? ` It waits: ${meta.held_by}.` : ' It goes now.';
}

function target(configuration) {
  const c = configuration || {};
  if (c.url) return c.url;
  if (c.destination) return `${c.destination}${c.brokers ? ` on ${[].concat(c.brokers).join(', ')}` : ''}`;
  return '';
}

// What holds an integration back, or how it is doing, in one word (and a class for its colour).
function health(row) {
  if (row.disabled) return ['disabled (410)', 'failing'];
  if (row.paused) return ['paused', 'held'];
  if (row.circuit === 'open') return ['circuit open', 'failing'];
  if (row.paused_until) return ['slowed down', 'held'];
  if (!row.enabled) return ['off', 'idle'];
  const failedLast = row.last_failure_at && (!row.last_success_at || row.last_failure_at > row.last_success_at);
  if (failedLast || row.dead > 0) return ['failing', 'failing'];
  if (!row.last_success_at) return ['idle', 'idle'];
  return ['ok', 'healthy'];
}

// Until when a hold the target asked for (or the breaker's cool-down) lasts, when one does.
function heldUntil(row) {
  const until = row.circuit_open_until || row.paused_until;
  return until ? el('div', { class: 'muted' }, `until ${localTime(new Date(until))}`) : null;
}

// Deliveries per bucket of minutes (green) and failures (red), stacked: `minutes` as the chart API gives them.
function chart(minutes, { width = 240, height = 36, bars = 72 } = {}) {
  const per = Math.max(1, Math.ceil(minutes.length / bars));
  const buckets = [];
  for (let i = 0; i < minutes.length; i += per) {
    const group = minutes.slice(i, i + per);
    buckets.push({
      at: group[0].minute,
      ok: group.reduce((n, m) => n + m.delivered, 0),
      bad: group.reduce((n, m) => n + m.failed + m.dead, 0),
    });
  }
  const top = Math.max(1, ...buckets.map((b) => b.ok + b.bad));
  const w = width / Math.max(1, buckets.length);
  const hours = Math.round(minutes.length / 60);
  const svg = el('svg:svg', {
    class: 'chart', width, height, viewBox: `0 0 ${width} ${height}`, role: 'img',
    'aria-label': `deliveries and failures per ${per} minutes over the last ${hours} hours`,
  });
  svg.append(el('svg:line', { class: 'axis', x1: 0, x2: width, y1: height - 0.5, y2: height - 0.5 }));
  buckets.forEach((b, i) => {
    const okH = (b.ok / top) * (height - 2);
    const badH = (b.bad / top) * (height - 2);
    const title = el('svg:title', {}, `${localTime(new Date(b.at))}: ${b.ok} delivered, ${b.bad} failed`);
    const g = el('svg:g', {}, title);
    if (b.ok) g.append(el('svg:rect', { class: 'ok', x: i * w, width: Math.max(1, w - 1), y: height - okH, height: okH }));
    if (b.bad) {
      g.append(el('svg:rect', {
        class: 'bad', x: i * w, width: Math.max(1, w - 1), y: height - okH - badH, height: badH,
      }));
    }
    svg.append(g);
  });
  return svg;
}

// -- the overview -----------------------------------------------------------------------------------------

async function overview(main, _, view) {
  const integrations = el('div');
  const rest = el('div');
  const tail = liveTail(view);
  show(main, el('h1', {}, 'Overview'), integrations, tail, rest);
  const charts = new Map(); // name -> [fetched at, minutes]

  async function chartOf(name) {
    const cached = charts.get(name);
    if (cached && Date.now() - cached[0] < 30000) return cached[1];
    const minutes = (await api(`/v1/integrations/${enc(name)}/chart?hours=6`)).data;
    charts.set(name, [Date.now(), minutes]);
    return minutes;
  }

  async function refresh() {
    const [status, configured] = await Promise.all([api('/v1/status'), api('/v1/integrations')]);
    const byName = new Map(configured.data.map((i) => [i.name, i]));
    const rows = status.data.integrations;
    const minutes = await Promise.all(rows.map((r) => chartOf(r.name)));
    show(integrations, el('table', { id: 'integrations' },
      el('thead', {}, el('tr', {},
        ['Integration', 'Type', 'Target', 'State'].map((h) => el('th', {}, h)),
        ['Pending', 'Dead', 'Delivered 1 h', 'Failed 1 h', 'Success', 'p50 / p99'].map((h) => el('th', { class: 'num' }, h)),
        ['Last success', 'Last error', 'Last 6 hours'].map((h) => el('th', {}, h)))),
      el('tbody', {}, rows.map((row, i) => integrationRow(row, byName.get(row.name), minutes[i])))));
    show(rest, daemons(status.data), reload(status.data));
  }

  await refresh();
  view.every(5000, refresh);
}

function integrationRow(row, configured, minutes) {
  const [word, kind] = health(row);
  const latency = row.latency_last_hour;
  return el('tr', { class: kind, 'data-integration': row.name },
    el('td', {}, el('a', { href: `#/integration/${enc(row.name)}` }, row.name)),
    el('td', {}, row.integration_type),
    el('td', { class: 'target' }, target(configured && configured.configuration)),
    el('td', { class: 'state' }, badge(word, kind === 'healthy' ? 'ok' : kind),
      row.circuit === 'half_open' ? badge('circuit half open', 'held') : null,
      heldUntil(row)),
    el('td', { class: 'num pending' }, count(row.pending, row)),
    el('td', { class: 'num dead' }, count(row.dead, row)),
    el('td', { class: 'num' }, num(row.delivered_last_hour)),
    el('td', { class: 'num' }, num(row.failed_last_hour)),
    el('td', { class: 'num' }, row.success_rate_last_hour === null ? '—' : `${(row.success_rate_last_hour * 100).toFixed(1)} %`),
    el('td', { class: 'num' }, latency ? `${ms(latency.p50)} / ${ms(latency.p99)}` : '—'),
    el('td', {}, when(row.last_success_at)),
    el('td', { class: 'error-text last-error' }, row.last_error ? [when(row.last_failure_at), el('br'), row.last_error] : ''),
    el('td', {}, chart(minutes)));
}

function daemons(status) {
  const list = status.daemons || [];
  return el('section', {},
    el('h2', {}, list.length > 1 ? `Daemons (${list.length}, sharing one database)` : 'Daemon'),
    el('table', { id: 'daemons' },
      el('thead', {}, el('tr', {}, ['Id', 'Host', 'PID', 'Version', 'Started', 'Last seen', 'Configuration']
        .map((h) => el('th', {}, h)))),
      el('tbody', {}, list.map((d) => el('tr', {},
        el('td', { class: 'mono' }, d.id, d.this ? ' (this one)' : ''), el('td', {}, d.host), el('td', {}, d.pid),
        el('td', {}, d.version), el('td', {}, when(d.started_at)), el('td', {}, when(d.last_seen)),
        el('td', {}, d.config_differs ? badge('differs from this one', 'failing') : badge('same', 'ok')))))));
}

function reload(status) {
  const last = status.config.last_reload;
  return el('section', { id: 'reload' },
    el('h2', {}, 'Configuration'),
    el('dl', { class: 'facts' },
      el('dt', {}, 'File'), el('dd', { class: 'mono' }, status.config.path || '—'),
      el('dt', {}, 'Running since'), el('dd', {}, when(status.started_at), ` · eventrelay ${status.version}`),
      el('dt', {}, 'Last reload'),
      el('dd', {}, last === null ? 'none since the start'
        : [when(last.at), ' ', last.ok ? badge('applied', 'ok') : badge('refused', 'failing'),
          last.errors.length ? el('ul', {}, last.errors.map((e) => el('li', { class: 'error-text' }, e))) : null])));
}

// New attempts as they are logged (Server-Sent Events from /v1/tail), newest on top.
function liveTail(view) {
  const body = el('tbody');
  const section = el('section', {},
    el('h2', {}, 'Live deliveries'),
    el('table', { id: 'tail' },
      el('thead', {}, el('tr', {}, ['Time', 'Integration', 'Event', 'Type', 'Attempt', 'Result', 'Took', 'Error']
        .map((h) => el('th', {}, h)))),
      body));
  const source = new EventSource('/v1/tail');
  const live = $('#live');
  source.addEventListener('open', () => live.classList.replace('off', 'on'));
  source.addEventListener('error', () => live.classList.replace('on', 'off'));
  source.addEventListener('attempt', (message) => {
    const a = JSON.parse(message.data);
    body.prepend(el('tr', { class: 'new', 'data-event': a.event_id },
      el('td', {}, when(a.at)),
      el('td', {}, el('a', { href: `#/integration/${enc(a.integration)}` }, a.integration)),
      el('td', { class: 'mono' }, el('a', { href: `#/event/${enc(a.event_id)}` }, a.event_id)),
      el('td', {}, a.event_type),
      el('td', { class: 'num' }, a.attempt),
      el('td', {}, a.succeeded ? badge(`delivered${a.status_code ? ` ${a.status_code}` : ''}`, 'delivered')
        : badge(`failed${a.status_code ? ` ${a.status_code}` : ''}`, 'failed')),
      el('td', { class: 'num' }, ms(a.processing_time)),
      el('td', { class: 'error-text' }, a.error_detail || '')));
    while (body.rows.length > 100) body.deleteRow(-1);
  });
  view.onStop(() => { source.close(); live.classList.replace('on', 'off'); });
  return section;
}

// -- an event ---------------------------------------------------------------------------------------------

async function eventPage(main, [id], view) {
  async function render() {
    const event = (await api(`/v1/events/${enc(id)}`)).data;
    show(main,
      el('h1', {}, 'Event ', el('span', { class: 'mono', id: 'event-id' }, event.id)),
      el('dl', { class: 'facts' },
        el('dt', {}, 'Type'), el('dd', {}, event.type),
        el('dt', {}, 'Accepted'), el('dd', {}, when(event.accepted_at))),
      el('h2', {}, 'Payload'),
      el('pre', { class: 'json', id: 'payload' }, JSON.stringify(event.payload, null, 2)),
      el('h2', {}, 'Deliveries'),
      event.jobs.length ? event.jobs.map((job) => jobCard(job, render))
        : el('p', { class: 'muted' }, 'No integration observes this event.'));
    return event.jobs.some((j) => j.state === 'pending');
  }

  let pending = await render();
  // While a job is on its way, follow it (a retry shows up as delivered without a reload).
  view.every(2000, async () => { if (pending) pending = await render(); });
}

function jobCard(job, refresh) {
  const path = `/v1/integrations/${enc(job.integration)}`;
  let button;
  if (job.state === 'delivered') {
    button = action(`send-again-${job.integration}`, 'Send again',
      `Send event ${job.event_id} to ${job.integration} again? Other jobs of ${job.integration} created in the same `
      + 'two milliseconds (those of the same request) go again too.',
      async () => {
        const created = Date.parse(job.created_at);
        const answer = await api(`${path}/replay`, {
          method: 'POST',
          body: { since: new Date(created - 1).toISOString(), until: new Date(created + 1).toISOString() },
        });
        return `${answer.data.queued} job(s) of ${job.integration} re-queued.${sending(answer.meta)}`;
      }, refresh);
  } else {
    button = action(`retry-${job.integration}`, 'Retry now',
      `Retry job ${job.id} (event ${job.event_id}) to ${job.integration} now?`,
      async () => {
        const answer = await api(`${path}/jobs/${enc(job.id)}/retry`, { method: 'POST' });
        return `Job ${job.id} of ${job.integration} queued.${sending(answer.meta)}`;
      }, refresh);
  }
  return el('section', { class: 'card job', id: `job-${job.integration}`, 'data-state': job.state },
    el('div', { class: 'actions' },
      el('strong', {}, el('a', { href: `#/integration/${enc(job.integration)}` }, job.integration)),
      badge(job.state, `state ${job.state}`),
      el('span', { class: 'muted' }, `job ${job.id} · ${job.attempts} attempt(s)`
        + (job.next_attempt_at ? ` · next ${localTime(new Date(job.next_attempt_at))}` : '')),
      button),
    job.log.length ? attemptsTable(job.log) : el('p', { class: 'muted' }, 'Not attempted yet.'));
}

function attemptsTable(log) {
  return el('table', { class: 'attempts' },
    el('thead', {}, el('tr', {}, ['#', 'Time', 'Took', 'Status', 'Error', 'Answer'].map((h) => el('th', {}, h)))),
    el('tbody', {}, log.map((a) => el('tr', { class: a.succeeded ? 'healthy' : 'failing' },
      el('td', { class: 'num' }, a.attempt),
      el('td', {}, when(a.meta.timestamps.created_at)),
      el('td', { class: 'num' }, ms(a.processing_time)),
      el('td', { class: 'status-code' }, a.succeeded ? badge(String(a.status_code || 'ok'), 'delivered')
        : badge(String(a.status_code || 'failed'), 'failed')),
      el('td', { class: 'error-text' }, a.error_detail || ''),
      el('td', { class: 'answer' }, answerOf(a.body))))));
}

// The target's answer (its first 4 KiB): shown as it is when short, folded when long.
function answerOf(body) {
  if (!body) return '';
  if (body.length <= 160) return el('pre', {}, body);
  return el('details', {}, el('summary', {}, `${body.length.toLocaleString('en')} characters`), el('pre', {}, body));
}

// -- search -----------------------------------------------------------------------------------------------

function isoFromInput(value) { return value ? new Date(value).toISOString() : ''; }

function inputFromIso(iso) {
  if (!iso) return '';
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? '' : `${localTime(d).replace(' ', 'T')}`;
}

async function searchPage(main, [query], view) {
  const params = new URLSearchParams(query || '');
  const configured = (await api('/v1/integrations')).data;
  const form = el('form', { class: 'filters', id: 'filters' },
    el('label', {}, 'Type', el('input', { name: 'type', value: params.get('type') || '', placeholder: 'order.paid' })),
    el('label', {}, 'Integration', el('select', { name: 'integration' }, el('option', { value: '' }, 'any'),
      configured.map((i) => el('option', { value: i.name, selected: params.get('integration') === i.name }, i.name)))),
    el('label', {}, 'State', el('select', { name: 'state' }, ['', 'pending', 'delivered', 'dead'].map((s) =>
      el('option', { value: s, selected: (params.get('state') || '') === s }, s || 'any')))),
    el('label', {}, 'Created from', el('input', { name: 'since', type: 'datetime-local', step: 1, value: inputFromIso(params.get('since')) })),
    el('label', {}, 'until', el('input', { name: 'until', type: 'datetime-local', step: 1, value: inputFromIso(params.get('until')) })),
    el('button', { type: 'submit', class: 'primary', id: 'search-submit' }, 'Search'));
  form.addEventListener('submit', (e) => {
    e.preventDefault();
    const chosen = new URLSearchParams();
    for (const [key, value] of new FormData(form)) {
      const v = key === 'since' || key === 'until' ? isoFromInput(value) : value.trim();
      if (v) chosen.set(key, v);
    }
    location.hash = `#/search?${chosen}`;
  });
  const body = el('tbody');
  const more = el('div', { class: 'more' });
  const tools = el('div', { class: 'actions' });
  if (params.get('integration') && params.get('state') === 'dead') {
    const name = params.get('integration');
    const range = { since: params.get('since') || undefined, until: params.get('until') || undefined };
    tools.append(action('retry-matching', 'Retry these dead jobs',
      `Re-queue every dead job of ${name}${range.since || range.until ? ' created in this time range' : ''}? `
      + 'They are sent now.',
      async () => {
        const answer = await api(`/v1/integrations/${enc(name)}/replay`, { method: 'POST', body: { state: 'dead', ...range } });
        return `${answer.data.queued} dead job(s) of ${name} re-queued.${sending(answer.meta)}`;
      }, () => route()));
  }
  show(main, el('h1', {}, 'Search'), form, tools,
    el('table', { id: 'results' }, el('thead', {}, el('tr', {},
      ['Event', 'Type', 'Integration', 'State', 'Attempts', 'Created', 'Last error'].map((h) => el('th', {}, h)))), body),
    more);

  const api_params = new URLSearchParams(params);
  api_params.set('limit', '50');
  let next = `/v1/jobs?${api_params}`;
  async function page() {
    const answer = await api(next);
    body.append(...answer.data.map((job) => el('tr', { 'data-event': job.event_id },
      el('td', { class: 'mono' }, el('a', { href: `#/event/${enc(job.event_id)}` }, job.event_id)),
      el('td', {}, job.event_type),
      el('td', {}, el('a', { href: `#/integration/${enc(job.integration)}` }, job.integration)),
      el('td', {}, badge(job.state)),
      el('td', { class: 'num' }, job.attempts),
      el('td', {}, when(job.created_at)),
      el('td', { class: 'error-text' }, job.last_error || ''))));
    next = answer.links.next;
    show(more, next ? el('button', { type: 'button', id: 'older', onclick: page }, 'Older')
      : el('span', { class: 'muted' }, body.rows.length ? 'No older jobs match.' : 'No job matches.'));
  }
  await page();
  if (params.get('notfound')) flash(`No event with the id “${params.get('notfound')}” is stored; these are the jobs of that type.`);
}

// -- an integration ---------------------------------------------------------------------------------------

async function integrationPage(main, [name], view) {
  const path = `/v1/integrations/${enc(name)}`;
  const configured = (await api(path)).data;
  const head = el('div');
  const chartBox = el('div');
  const jobsBox = el('div');
  const logBox = el('div');
  show(main, 
    el('h1', {}, name, ' ', el('span', { class: 'muted' }, configured.integration_type)),
    head,
    el('h2', {}, 'Deliveries'), chartBox,
    el('h2', {}, 'Jobs'), jobsBox,
    el('h2', {}, 'Attempt log'), logBox,
    el('h2', {}, 'Configuration'),
    el('pre', { class: 'json', id: 'configuration' }, JSON.stringify(configured, null, 2)));

  async function refreshHead() {
    const row = (await api('/v1/status')).data.integrations.find((r) => r.name === name);
    show(head, row ? integrationHead(name, row, refreshAll) : el('p', { class: 'muted' }, 'Not running.'));
  }
  let hours = 6;
  async function refreshChart() {
    const minutes = (await api(`${path}/chart?hours=${hours}`)).data;
    const picker = el('select', { id: 'chart-hours', onchange: (e) => { hours = Number(e.target.value); refreshChart(); } },
      [6, 24, 48].map((h) => el('option', { value: h, selected: h === hours }, `last ${h} hours`)));
    show(chartBox, el('div', { class: 'actions' }, picker,
      el('span', { class: 'legend' }, el('span', { class: 'ok' }, 'delivered'), ' ', el('span', { class: 'bad' }, 'failed'))),
    chart(minutes, { width: 960, height: 120, bars: 144 }));
  }
  let state = 'dead';
  async function refreshJobs() {
    const body = el('tbody');
    const more = el('div', { class: 'more' });
    const tabs = el('div', { class: 'tabs' }, ['pending', 'dead', 'delivered'].map((s) =>
      el('button', { type: 'button', class: s === state ? 'current' : '', id: `jobs-${s}`,
        onclick: () => { state = s; refreshJobs(); } }, s)));
    show(jobsBox, tabs, el('table', { id: 'jobs' }, el('thead', {}, el('tr', {},
      ['Job', 'Event', 'Type', 'State', 'Attempts', 'Created', 'Next attempt', 'Last error'].map((h) => el('th', {}, h)))), body),
    more);
    let next = `/v1/jobs?integration=${enc(name)}&state=${state}&limit=25`;
    async function page() {
      const answer = await api(next);
      body.append(...answer.data.map((job) => el('tr', {},
        el('td', { class: 'mono' }, job.id),
        el('td', { class: 'mono' }, el('a', { href: `#/event/${enc(job.event_id)}` }, job.event_id)),
        el('td', {}, job.event_type), el('td', {}, badge(job.state)), el('td', { class: 'num' }, job.attempts),
        el('td', {}, when(job.created_at)), el('td', {}, when(job.next_attempt_at)),
        el('td', { class: 'error-text' }, job.last_error || ''))));
      next = answer.links.next;
      show(more, next ? el('button', { type: 'button', onclick: page }, 'Older')
        : el('span', { class: 'muted' }, body.rows.length ? '' : `No ${state} job.`));
    }
    await page();
  }
  async function refreshLog() {
    const body = el('tbody');
    const more = el('div', { class: 'more' });
    show(logBox, el('table', { id: 'log' }, el('thead', {}, el('tr', {},
      ['Time', 'Event', 'Attempt', 'Result', 'Took', 'Error'].map((h) => el('th', {}, h)))), body), more);
    let next = `/v1/attempts?integration=${enc(name)}&limit=25`;
    async function page() {
      const answer = await api(next);
      body.append(...answer.data.map((a) => el('tr', { class: a.succeeded ? 'healthy' : 'failing' },
        el('td', {}, when(a.at)),
        el('td', { class: 'mono' }, el('a', { href: `#/event/${enc(a.event_id)}` }, a.event_id)),
        el('td', { class: 'num' }, a.attempt),
        el('td', {}, a.succeeded ? badge(`delivered${a.status_code ? ` ${a.status_code}` : ''}`, 'delivered')
          : badge(`failed${a.status_code ? ` ${a.status_code}` : ''}`, 'failed')),
        el('td', { class: 'num' }, ms(a.processing_time)),
        el('td', { class: 'error-text' }, a.error_detail || ''))));
      next = answer.links.next;
      show(more, next ? el('button', { type: 'button', onclick: page }, 'Older')
        : el('span', { class: 'muted' }, body.rows.length ? '' : 'No attempt yet.'));
    }
    await page();
  }
  async function refreshAll() {
    await Promise.all([refreshHead(), refreshChart(), refreshJobs(), refreshLog()]);
  }
  await refreshAll();
  view.every(5000, refreshHead);
}

function integrationHead(name, row, refresh) {
  const path = `/v1/integrations/${enc(name)}`;
  const [word, kind] = health(row);
  const buttons = [];
  const post = (suffix, body) => api(`${path}/${suffix}`, { method: 'POST', body });
  if (row.paused) {
    buttons.push(action('action-resume', 'Resume', `Resume ${name}? Its ${row.pending} pending job(s) go now.`,
      async () => { await post('resume'); return `${name} resumed.`; }, refresh));
  } else {
    buttons.push(action('action-pause', 'Pause', `Pause ${name}? It keeps its jobs and sends nothing until resumed `
      + '(also after a restart).', async () => { await post('pause'); return `${name} paused.`; }, refresh));
  }
  if (row.disabled) {
    buttons.push(action('action-enable', 'Enable', `Enable ${name} again? Its target answered 410 Gone `
      + `(${row.disabled.reason}).`, async () => { await post('enable'); return `${name} enabled.`; }, refresh));
  }
  if (row.circuit === 'open' || row.circuit === 'half_open') {
    buttons.push(action('action-close-circuit', 'Close circuit', `Close the circuit of ${name} and send again now?`,
      async () => { await post('close-circuit'); return `The circuit of ${name} is closed.`; }, refresh));
  }
  if (row.dead > 0) {
    buttons.push(action('action-retry-dead', `Retry ${row.dead} dead`, `Re-queue the ${row.dead} dead job(s) of ${name}? They are sent now.`,
      async () => {
        const answer = await post('replay', { state: 'dead' });
        return `${answer.data.queued} dead job(s) of ${name} re-queued.${sending(answer.meta)}`;
      }, refresh));
  }
  buttons.push(action('action-test', 'Send a test event', `Send a test event (type eventrelay.test) to ${name} alone, now?`,
    async () => {
      const answer = await post('test', {});
      return `Test event ${answer.data.id} sent to ${name}.${sending(answer.meta)}`;
    }, refresh));

  const since = el('input', { type: 'datetime-local', step: 1, id: 'replay-since', required: true });
  const until = el('input', { type: 'datetime-local', step: 1, id: 'replay-until' });
  const replayButton = action('action-replay', 'Replay', `Replay every delivered and dead job of ${name} created in this range?`,
    async () => {
      if (!since.value) throw new Error('say from when to replay');
      const body = { since: isoFromInput(since.value), until: until.value ? isoFromInput(until.value) : new Date().toISOString() };
      const answer = await post('replay', body);
      return `${answer.data.queued} job(s) of ${name} re-queued.${sending(answer.meta)}`;
    }, refresh);
  const latency = row.latency_last_hour;
  return el('div', {},
    el('dl', { class: 'facts', id: 'integration-state' },
      el('dt', {}, 'State'), el('dd', {}, badge(word, kind === 'healthy' ? 'ok' : kind),
        row.paused ? el('span', { class: 'muted' }, ' since ', when(row.paused.at)) : null,
        row.circuit_open_until ? el('span', { class: 'muted' }, ' until ', when(row.circuit_open_until)) : null),
      el('dt', {}, 'Pending / dead'), el('dd', {}, `${count(row.pending, row)} / ${count(row.dead, row)} · ${row.in_flight} in flight`),
      el('dt', {}, 'Last hour'), el('dd', {}, `${num(row.delivered_last_hour)} delivered, ${num(row.failed_last_hour)} failed`
        + (latency ? ` · p50 ${ms(latency.p50)}, p99 ${ms(latency.p99)}` : '')),
      el('dt', {}, 'Last success'), el('dd', {}, when(row.last_success_at)),
      el('dt', {}, 'Last error'), el('dd', { class: 'error-text' }, row.last_error ? [when(row.last_failure_at), ' ', row.last_error] : '—')),
    el('div', { class: 'actions' }, buttons),
    el('div', { class: 'actions' }, el('span', { class: 'muted' }, 'Replay jobs created from'), since,
      el('span', { class: 'muted' }, 'until'), until, replayButton));
}

// -- the audit log ----------------------------------------------------------------------------------------

async function auditPage(main) {
  const body = el('tbody');
  const more = el('div', { class: 'more' });
  show(main, el('h1', {}, 'Audit log'),
    el('p', { class: 'muted' }, 'Operators\' actions, newest first: who (the token\'s scope and fingerprint, the '
      + 'address), what, and what came of it.'),
    el('table', { id: 'audit' }, el('thead', {}, el('tr', {},
      ['Time', 'Action', 'Target', 'Scope', 'Token', 'From', 'Detail'].map((h) => el('th', {}, h)))), body), more);
  let next = '/v1/audit?limit=50';
  async function page() {
    const answer = await api(next);
    body.append(...answer.data.map((e) => el('tr', { 'data-action': e.action },
      el('td', {}, when(e.at)), el('td', {}, badge(e.action, 'idle')),
      el('td', {}, e.target ? el('a', { href: `#/integration/${enc(e.target.split('/')[0])}` }, e.target) : '—'),
      el('td', {}, e.scope), el('td', { class: 'mono' }, e.token || '—'), el('td', {}, e.address || '—'),
      el('td', { class: 'mono' }, e.detail || ''))));
    next = answer.links.next;
    show(more, next ? el('button', { type: 'button', onclick: page }, 'Older')
      : el('span', { class: 'muted' }, body.rows.length ? '' : 'No action recorded yet.'));
  }
  await page();
}

// -- routing ----------------------------------------------------------------------------------------------

const ROUTES = [
  [/^#\/?$/, overview, 'nav-overview'],
  [/^#\/search(?:\?(.*))?$/, searchPage, 'nav-search'],
  [/^#\/event\/(.+)$/, eventPage, null],
  [/^#\/integration\/([^/?]+)$/, integrationPage, null],
  [/^#\/audit$/, auditPage, 'nav-audit'],
];

let current = null;

// A page's life: its timers and streams end when another page is shown.
class View {
  constructor() { this.timers = []; this.stops = []; this.alive = true; }
  every(millis, call) {
    const timer = setInterval(async () => {
      if (!this.alive) return;
      try { await call(); } catch (error) { flash(error.message, true); }
    }, millis);
    this.timers.push(timer);
  }
  onStop(call) { this.stops.push(call); }
  stop() {
    this.alive = false;
    this.timers.forEach(clearInterval);
    this.stops.forEach((call) => call());
  }
}

async function route() {
  if (current) current.stop();
  const hash = location.hash || '#/';
  const main = $('#main');
  for (const [pattern, page, nav] of ROUTES) {
    const match = hash.match(pattern);
    if (!match) continue;
    document.querySelectorAll('header nav a').forEach((a) => a.classList.toggle('current', a.id === nav));
    const view = new View();
    current = view;
    try {
      await page(main, match.slice(1).map((part) => (part === undefined ? undefined : decodeURIComponent(part))), view);
    } catch (error) {
      if (view.alive) show(main, el('h1', {}, 'Not shown'), el('p', { class: 'error' }, error.message));
    }
    return;
  }
  show(main, el('h1', {}, 'No such page'), el('p', {}, el('a', { href: '#/' }, 'Back to the overview')));
}

// The search box: an event's id opens the event; anything else lists the jobs of events of that type.
async function search(text) {
  const q = text.trim();
  if (!q) { location.hash = '#/search'; return; }
  const found = await fetch(`/v1/events/${enc(q)}`, { method: 'HEAD', credentials: 'same-origin' }).catch(() => null);
  if (found && found.ok) location.hash = `#/event/${enc(q)}`;
  else location.hash = `#/search?${new URLSearchParams({ type: q, notfound: q })}`;
}

async function start() {
  const answer = await fetch('/ui/session', { credentials: 'same-origin' });
  if (answer.status === 401) { location.assign('/ui/'); return; }
  session = (await answer.json()).data;
  if (session.login) $('#logout-form').classList.remove('hidden');
  $('#search-form').addEventListener('submit', (e) => { e.preventDefault(); search($('#search').value); });
  window.addEventListener('hashchange', route);
  await route();
}

start();
