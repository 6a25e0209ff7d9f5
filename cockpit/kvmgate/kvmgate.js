/* kvmgate in Cockpit: each user's own VMs, their console and their screen.
 *
 * Everything goes through `kvmgate ... --json`, spawned by Cockpit's bridge,
 * which runs as the logged-in user: the page has exactly that user's rights,
 * and kvmgate's helper decides, as for a terminal. The serial console is a
 * pty channel on `kvmgate console NAME` in xterm.js; the screen is noVNC over
 * a Cockpit channel to the VM's owner-only VNC socket (the bridge may open it
 * because it runs as the owner). The administrator view runs the same
 * commands through Cockpit's superuser (sudo), never as root by default.
 */

import { KVMGATE, AUDIT_LOG } from "./config.js";

const POLL_MS = 5000; // at most every 5 s, and never in a hidden tab
const $ = (id) => document.getElementById(id);

let adminView = false;
let current = null; // {view, name, owner, generation}
let generation = 0; // each route's renders: a slow answer for an earlier view is dropped
let polling = false; // one poll at a time
let busy = false; // one operation at a time from this page
const NAME = /^[a-z][a-z0-9]*([-_][a-z0-9]+)*$/; // kvmgate's VM-name grammar (docs/layout.md)
const OWNER = /^[a-z_][a-z0-9_-]{0,31}$/;
let term = null;
let termChannel = null;
let rfb = null;

/* ---------------------------------------------------------------- running kvmgate */

function oneLine(ex) {
    // kvmgate's own one-line refusal, never a stack trace
    let msg = (ex && (ex.message || ex.problem)) || String(ex);
    const lines = String(msg).split("\n").map((l) => l.trim()).filter((l) => l);
    msg = lines.length ? lines[lines.length - 1] : String(msg);
    return msg.replace(/^kvmgate: /, "").replace(/ \(see kvmgate --help\)$/, "");
}

function showError(ex) {
    const e = $("error");
    e.textContent = oneLine(ex);
    e.hidden = false;
}

function clearError() {
    $("error").hidden = true;
    $("error").textContent = "";
}

function kvmgate(args, opts) {
    const o = { err: "message", ...(opts || {}) };
    if (adminView) o.superuser = "require";
    return cockpit.spawn([KVMGATE, ...args], o);
}

async function json(args) {
    const out = await kvmgate([...args, "--json"]);
    return JSON.parse(out);
}

function owned(args) {
    // the administrator acts on someone's VM with --owner
    return adminView && current && current.owner ? [...args, "--owner", current.owner] : args;
}

async function withProgress(what, fn) {
    if (busy) return null;
    busy = true;
    document.body.classList.add("busy");
    const p = $("progress");
    const began = Date.now();
    p.textContent = `${what}…`;
    p.hidden = false;
    const tick = window.setInterval(() => {
        p.textContent = `${what}… ${Math.round((Date.now() - began) / 1000)} s`;
    }, 1000);
    try {
        clearError();
        return await fn();
    } catch (ex) {
        showError(ex);
        return null;
    } finally {
        window.clearInterval(tick);
        p.hidden = true;
        busy = false;
        document.body.classList.remove("busy");
    }
}

/* ------------------------------------------------------------------ small helpers */

function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
        if (k === "onclick") e.addEventListener("click", v);
        else if (k === "text") e.textContent = v;
        else if (v !== null && v !== undefined && v !== false) e.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return e;
}

function stateCell(state) {
    return el("span", { class: `state state-${state}`, "data-state": state }, state);
}

function duration(s) {
    if (s === undefined || s === null) return "";
    const d = Math.floor(s / 86400);
    const h = Math.floor((s % 86400) / 3600);
    const m = Math.floor((s % 3600) / 60);
    return (d ? `${d}d ` : "") + (h ? `${h}h ` : "") + `${m}m ${s % 60}s`;
}

/* ---------------------------------------------------------------------- the list */

function vmHref(vm) {
    const enc = encodeURIComponent;
    return adminView ? `#/vm/${enc(vm.owner)}/${enc(vm.name)}` : `#/vm/${enc(vm.name)}`;
}

async function vmTable() {
    const vms = adminView ? await json(["admin", "list"]) : await json(["list"]);
    const rows = vms.map((vm) => el("tr", { "data-vm": vm.name },
        ...(adminView ? [el("td", {}, vm.owner)] : []),
        el("td", {}, el("a", { href: vmHref(vm) }, vm.name)),
        el("td", {}, stateCell(vm.state))));
    if (!rows.length) return el("p", { class: "muted", id: "no-vms" }, "No VMs yet.");
    return el("table", { id: "vms" },
        el("thead", {}, el("tr", {}, ...(adminView ? [el("th", {}, "owner")] : []), el("th", {}, "name"), el("th", {}, "state"))),
        el("tbody", {}, ...rows));
}

async function listView(gen) {
    let table;
    try {
        table = await vmTable();
    } catch (ex) {
        showError(ex);
        return;
    }
    const sections = [el("section", {}, el("h2", {}, adminView ? "Every VM" : "Your VMs"), el("div", { id: "vm-table" }, table))];
    sections.push(adminView ? await adminSections() : await templatesSection());
    if (gen === generation) $("main").replaceChildren(...sections);
}

async function templatesSection() {
    let templates = [];
    let quota = null;
    try {
        templates = await json(["templates"]);
        quota = await json(["quota"]);
    } catch (ex) {
        return el("section", {}, el("h2", {}, "Make a VM"), el("p", { class: "muted" }, oneLine(ex)));
    }
    if (!templates.length) return el("section", {}, el("h2", {}, "Make a VM"), el("p", { class: "muted" }, "No templates are granted to you."));
    const select = el("select", { id: "template" }, ...templates.map((t) => el("option", { value: t.name }, `${t.name} — ${t.description || ""}`)));
    const name = el("input", { type: "text", id: "new-name", placeholder: "name" });
    const create = el("button", {
        class: "primary",
        id: "create",
        onclick: () => withProgress("Making the VM", async () => {
            await kvmgate(["create", name.value, "--template", select.value]);
            await refresh();
        }),
    }, "Create");
    const used = quota ? quota.resources.map((r) => `${r.resource} ${r.used}${r.limit === null ? "" : " of " + r.limit}`).join(", ") : "";
    return el("section", {}, el("h2", {}, "Make a VM from a template"), select, " ", name, " ", create,
        el("p", { class: "muted" }, used));
}

async function adminSections() {
    const owner = el("input", { type: "text", id: "admin-owner", placeholder: "owner" });
    const name = el("input", { type: "text", id: "admin-name", placeholder: "name" });
    const opts = el("input", { type: "text", id: "admin-options", placeholder: "-m 1024 -nographic ..." });
    const out = [el("section", {}, el("h2", {}, "Define a VM for a user"), owner, " ", name, " ", opts, " ",
        el("button", {
            class: "primary",
            id: "admin-create",
            onclick: () => withProgress("Defining the VM", async () => {
                const words = opts.value.split(/\s+/).filter((x) => x);
                await kvmgate(["admin", "create", name.value, "--owner", owner.value, ...(words.length ? ["--", ...words] : [])]);
                await refresh();
            }),
        }, "Create"))];
    try {
        const t = await json(["admin", "template", "list"]);
        const rows = (t.templates || t).map((x) => el("tr", {}, el("td", {}, x.name), el("td", {}, (x.options || []).join(" ")),
            el("td", {}, (x.granted_to || []).join(", ")), el("td", {}, String(x.vms ?? ""))));
        out.push(el("section", {}, el("h2", {}, "Templates"),
            el("table", {}, el("tr", {}, el("th", {}, "name"), el("th", {}, "options"), el("th", {}, "granted to"), el("th", {}, "VMs")), ...rows)));
        const images = await json(["admin", "image", "list"]);
        out.push(el("section", {}, el("h2", {}, "Images"),
            el("ul", {}, ...images.map((i) => el("li", {}, `${i.name} (${Math.round((i.virtual_size || 0) / 1048576)} MiB)`)))));
        const audit = await cockpit.spawn(["tail", "-n", "30", AUDIT_LOG], { superuser: "require", err: "message" });
        out.push(el("section", {}, el("h2", {}, "Audit log (newest last)"), el("pre", { class: "log", id: "audit" }, audit)));
    } catch (ex) {
        out.push(el("section", {}, el("p", { class: "muted" }, oneLine(ex))));
    }
    return el("div", {}, ...out);
}

/* ------------------------------------------------------------------------ one VM */

async function vmView(name, gen) {
    const main = $("main");
    let st;
    try {
        st = await json(owned(["status", name]));
    } catch (ex) {
        if (gen !== generation) return;
        showError(ex);
        main.replaceChildren(el("section", {}, el("p", { id: "missing" }, oneLine(ex))));
        return;
    }
    if (gen !== generation) return;
    const status = el("section", { id: "status" }, el("h2", {}, `${name}`), statusList(st));
    const actions = el("section", { id: "actions" }, el("h2", {}, "Actions"), ...actionButtons(name, st), startForm(name), snapshotForm(name));
    const consoleSec = el("section", { id: "console" }, el("h2", {}, "Serial console"),
        el("button", { id: "console-connect", onclick: () => connectConsole(name) }, "Connect"),
        el("button", { id: "console-disconnect", onclick: disconnectConsole }, "Disconnect"),
        el("div", { id: "console-term" }));
    const screen = el("section", { id: "screen-section" }, el("h2", {}, "Screen"),
        el("button", { id: "screen-connect", onclick: () => connectScreen(name) }, "Show the screen"),
        el("div", { id: "screen" }));
    const log = el("section", { id: "log-section" }, el("h2", {}, "Console history (kvmgate log)"),
        el("button", { onclick: () => showLog(name) }, "Refresh"), el("pre", { class: "log", id: "log" }, ""));
    const del = el("section", {}, el("h2", {}, "Delete"),
        el("button", {
            class: "danger",
            id: "delete",
            onclick: () => withProgress(`Deleting ${name}`, async () => {
                if (!window.confirm(`Delete ${name} and its disks?`)) return;
                await kvmgate(adminView ? ["admin", "delete", name, "--owner", current.owner, "--force"] : ["delete", name, "--force"]);
                window.location.hash = "#/";
            }),
        }, "Delete this VM"));
    const parts = [status, actions, consoleSec, screen, log];
    if (adminView || st.template) parts.push(del); // users delete the VMs they made from templates
    main.replaceChildren(...parts);
    showLog(name);
    showSnapshots(name);
}

function statusList(st) {
    const rows = [
        ["state", stateCell(st.state)],
        ["owner", st.owner],
        ["memory", st.memory_mib !== undefined ? `${st.memory_mib} MiB` : ""],
        ["vCPUs", st.vcpus ?? ""],
        ["uptime", duration(st.uptime_seconds)],
        ["on logoff", `${st.on_logoff || ""}${st.logoff_delay !== undefined ? ` (after ${st.logoff_delay} s)` : ""}`],
        ["note", st.note || ""],
        ["last run", st.last_run ? `${st.last_run.ended || ""} ${st.last_run.how || ""}` : ""],
        ["template", st.template || ""],
    ];
    const dl = el("dl", { id: "status-list" });
    for (const [k, v] of rows) {
        if (v === "" || v === null || v === undefined) continue;
        dl.append(el("dt", {}, k), el("dd", { "data-key": k }, v));
    }
    for (const f of st.forwards || []) {
        // "ssh 127.0.0.1:20001"
        const [service, hostport] = f.split(" ");
        const port = (hostport || "").split(":").pop();
        dl.append(el("dt", {}, `port ${service}`), el("dd", {}, hostport, " ",
            service === "ssh" ? el("code", { class: "ssh" }, `kvmgate ssh ${st.name}${adminView ? " --owner " + st.owner : ""}`, `   (on the host: ssh -p ${port} ${hostport.split(":")[0]})`) : ""));
    }
    return dl;
}

function actionButtons(name, st) {
    const act = (label, args, what, enabled) => el("button", {
        id: `do-${label.toLowerCase().replace(/ /g, "-")}`,
        disabled: !enabled,
        onclick: () => withProgress(`${what} ${name}`, async () => {
            await kvmgate(owned(args));
            await refresh();
        }),
    }, label);
    const running = st.state === "running" || st.state === "paused";
    return [
        act("Stop", ["stop", name], "Stopping", running),
        act("Force stop", ["stop", name, "--force"], "Stopping", running),
        act("Freeze", ["freeze", name], "Freezing", st.state === "running"),
        act("Thaw", ["thaw", name], st.state === "hibernated" ? "Restoring" : "Thawing", st.state === "paused" || st.state === "hibernated"),
        act("Hibernate", ["hibernate", name], "Hibernating", running),
        act("Reset", ["reset", name], "Resetting", running),
    ];
}

function startForm(name) {
    const cdrom = el("input", { type: "text", id: "opt-cdrom", list: "home-files", placeholder: "~/debian.iso" });
    const hdb = el("input", { type: "text", id: "opt-hdb", list: "home-files", placeholder: "~/data.qcow2" });
    const boot = el("select", { id: "opt-boot" }, el("option", { value: "" }, "as defined"),
        el("option", { value: "c" }, "hard disk (c)"), el("option", { value: "d" }, "CD-ROM (d)"), el("option", { value: "n" }, "network (n)"),
        el("option", { value: "dc" }, "CD-ROM, then hard disk (dc)"), el("option", { value: "cd" }, "hard disk, then CD-ROM (cd)"));
    const snap = el("input", { type: "checkbox", id: "opt-snapshot" });
    const extra = el("input", { type: "text", id: "opt-extra", placeholder: "other options from your list, e.g. -smp 2" });
    const files = el("datalist", { id: "home-files" });
    cockpit.spawn(["sh", "-c", 'find "$HOME" -maxdepth 2 -type f \\( -name "*.iso" -o -name "*.qcow2" -o -name "*.img" -o -name "*.raw" \\) 2>/dev/null | head -200'],
        { err: "ignore" }).then((out) => {
        for (const f of out.split("\n").filter((x) => x)) files.append(el("option", { value: f }));
    }).catch(() => {});
    const loadvm = el("select", { id: "opt-loadvm" }, el("option", { value: "" }, "a fresh boot"));
    const expand = async (p) => (p.startsWith("~/") ? `${(await cockpit.user()).home}/${p.slice(2)}` : p);
    const go = el("button", {
        class: "primary",
        id: "start",
        onclick: (ev) => {
            ev.preventDefault();
            const opts = [];
            withProgress(`Starting ${name}`, async () => {
                if (cdrom.value) opts.push("-cdrom", await expand(cdrom.value));
                if (hdb.value) opts.push("-hdb", await expand(hdb.value));
                if (boot.value) opts.push("-boot", boot.value);
                if (snap.checked) opts.push("-snapshot");
                if (loadvm.value) opts.push("-loadvm", loadvm.value);
                opts.push(...extra.value.split(/\s+/).filter((x) => x));
                await kvmgate(owned(["start", name]).concat(opts.length ? ["--", ...opts] : []));
                await refresh();
            });
        },
    }, "Start");
    return el("form", { class: "start", id: "start-form" }, el("h3", {}, "Start (a hibernated VM is restored as it was)"),
        el("label", {}, "CD-ROM ", cdrom), el("label", {}, "second disk ", hdb), el("label", {}, "boot from ", boot),
        el("label", {}, snap, " discard disk writes (-snapshot)"), el("label", {}, "from snapshot ", loadvm),
        el("label", {}, "other ", extra), files, go);
}

function snapshotForm(name) {
    const tag = el("input", { type: "text", id: "snapshot-tag", placeholder: "tag" });
    return el("form", { class: "start" }, el("label", {}, "snapshot tag ", tag),
        el("button", {
            id: "snapshot",
            onclick: (ev) => {
                ev.preventDefault();
                withProgress(`Saving snapshot ${tag.value}`, () => kvmgate(owned(["snapshot", name, tag.value])));
            },
        }, "Take snapshot"));
}

async function showSnapshots(name) {
    try {
        const snaps = await json(owned(["snapshot", name, "--list"]));
        const select = $("opt-loadvm");
        for (const t of snaps.map((x) => x.tag || x.name || x).filter((x) => typeof x === "string")) {
            if (select) select.append(el("option", { value: t }, t));
        }
    } catch (ex) {
        // a VM without qcow2 disks has no snapshots: nothing to offer
    }
}

async function showLog(name) {
    try {
        const log = await json(owned(["log", name, "--lines", "300"]));
        $("log").textContent = log.text;
    } catch (ex) {
        $("log").textContent = oneLine(ex);
    }
}

/* --------------------------------------------------------------- console, screen */

function connectConsole(name) {
    disconnectConsole();
    clearError();
    const box = $("console-term");
    if (!window.Terminal) return showError("the console needs xterm.js in the page: kvmgate admin init --cockpit");
    term = new window.Terminal({ cols: 100, rows: 24, convertEol: false, scrollback: 2000 });
    term.open(box);
    const opts = {
        payload: "stream", spawn: [KVMGATE, ...owned(["console", name])], pty: true,
        window: { rows: 24, cols: 100 }, environ: ["TERM=xterm-256color"], err: "out",
    };
    if (adminView) opts.superuser = "require";
    termChannel = cockpit.channel(opts);
    termChannel.addEventListener("message", (ev, data) => term.write(data));
    termChannel.addEventListener("close", (ev, options) => {
        if (term) term.write(`\r\n[console closed${options && options.problem ? ": " + options.problem : ""}]\r\n`);
        termChannel = null;
    });
    term.onData((data) => { if (termChannel) termChannel.send(data); });
    term.focus();
}

function disconnectConsole() {
    if (termChannel) termChannel.close();
    termChannel = null;
    if (term) term.dispose();
    term = null;
}

async function connectScreen(name) {
    clearError();
    if (rfb) { rfb.disconnect(); rfb = null; }
    let info;
    try {
        info = await json(owned(["vnc", name]));
    } catch (ex) {
        return showError(ex);
    }
    let RFB;
    try {
        RFB = (await import("./vendor/novnc/core/rfb.js")).default;
    } catch (ex) {
        return showError("the screen needs noVNC in the page: kvmgate admin init --cockpit");
    }
    const opts = { payload: "stream", protocol: "binary", binary: "raw" };
    if (info.kind === "unix") opts.unix = info.socket;
    else { opts.address = "127.0.0.1"; opts.port = info.port; }
    if (adminView) opts.superuser = "require";
    const query = window.btoa(JSON.stringify(opts));
    const proto = window.location.protocol === "https:" ? "wss" : "ws";
    const url = `${proto}://${window.location.host}/cockpit/channel/${cockpit.transport.csrf_token}?${query}`;
    rfb = new RFB($("screen"), url, { wsProtocols: ["binary"], credentials: info.password ? { password: info.password } : undefined });
    rfb.scaleViewport = true;
    rfb.addEventListener("connect", () => $("screen").setAttribute("data-connected", "yes"));
    rfb.addEventListener("disconnect", () => $("screen").setAttribute("data-connected", "no"));
}

/* ------------------------------------------------------------ administrative access */

function askPassword(message, prompt) {
    // sudo's question in a password field (never shown), answered or cancelled once
    return new Promise((resolve) => {
        const input = el("input", { type: "password", id: "sudo-password", autocomplete: "current-password" });
        const box = el("form", { id: "sudo-form", class: "progress" }, `${message || "Administrative access"} `,
            el("label", {}, `${prompt || "Password:"} `, input), " ",
            el("button", { class: "primary", id: "sudo-ok", type: "submit" }, "Authenticate"),
            el("button", { id: "sudo-cancel", type: "button", onclick: () => { box.remove(); resolve(null); } }, "Cancel"));
        box.addEventListener("submit", (ev) => {
            ev.preventDefault();
            const value = input.value;
            box.remove();
            resolve(value);
        });
        document.body.insertBefore(box, $("main"));
        input.focus();
    });
}

function superuserProxy() {
    const client = cockpit.dbus(null, { bus: "internal" });
    return [client, client.proxy("cockpit.Superuser", "/superuser")];
}

async function superuser() {
    // Cockpit's own superuser bridge (sudo, with the user's password; manifest.json): the
    // same mechanism as Cockpit's "administrative access". Users without sudo rights get
    // sudo's refusal.
    const [client, proxy] = superuserProxy();
    try {
        await proxy.wait();
        if (proxy.Current !== "none" && proxy.Current !== "init") return true;
        const sub = client.subscribe({ path: "/superuser", interface: "cockpit.Superuser", member: "Prompt" },
            async (path, iface, signal, args) => {
                const answer = await askPassword(args[0], args[1]);
                if (answer === null) client.call("/superuser", "cockpit.Superuser", "Stop", []).catch(() => {});
                else client.call("/superuser", "cockpit.Superuser", "Answer", [answer]).catch(() => {});
            });
        try {
            await client.call("/superuser", "cockpit.Superuser", "Start", ["sudo"]);
        } finally {
            sub.remove();
        }
        return true;
    } catch (ex) {
        showError(`administrative access was refused: ${oneLine(ex)}`);
        return false;
    }
}

function dropSuperuser() {
    const [client] = superuserProxy();
    client.call("/superuser", "cockpit.Superuser", "Stop", []).catch(() => {});
}

/* ---------------------------------------------------------------------- routing */

async function refresh() {
    if (!current || polling) return;
    polling = true;
    const gen = generation;
    try {
        if (current.view === "list") {
            // only the table: a half-typed form is never wiped out
            const table = await vmTable();
            const box = $("vm-table");
            if (box && gen === generation) box.replaceChildren(table);
            return;
        }
        // one VM: only its status and buttons, never the open console or screen
        const st = await json(owned(["status", current.name]));
        if (gen !== generation) return;
        const s = $("status");
        const a = $("actions");
        if (s) s.replaceChildren(el("h2", {}, current.name), statusList(st));
        if (a) {
            const keep = [...a.querySelectorAll("form")];
            a.replaceChildren(el("h2", {}, "Actions"), ...actionButtons(current.name, st), ...keep);
        }
    } catch (ex) {
        if (gen === generation) showError(ex);
    } finally {
        polling = false;
    }
}

function route() {
    disconnectConsole();
    if (rfb) { rfb.disconnect(); rfb = null; }
    clearError();
    generation += 1;
    const gen = generation;
    let parts;
    try {
        parts = window.location.hash.replace(/^#\/?/, "").split("/").filter((x) => x).map(decodeURIComponent);
    } catch (ex) {
        parts = [];
    }
    if (parts[0] === "vm") {
        const [owner, name] = adminView ? [parts[1], parts[2]] : [null, parts[1]];
        if (name && NAME.test(name) && (!adminView || OWNER.test(owner || "")) && parts.length === (adminView ? 3 : 2)) {
            current = { view: "vm", owner, name };
            return vmView(name, gen);
        }
        current = { view: "missing" };
        showError("no such VM");
        $("main").replaceChildren(el("section", {}, el("p", { id: "missing" }, "no such VM")));
        return null;
    }
    current = { view: "list" };
    return listView(gen);
}

function hidden() {
    return cockpit.hidden || document.hidden;
}

function init() {
    cockpit.user().then((u) => { $("whoami").textContent = `signed in as ${u.name}`; });
    $("admin-switch").hidden = false;
    $("admin-view").addEventListener("change", async (ev) => {
        if (ev.target.checked && !(await superuser())) {
            ev.target.checked = false;
            return;
        }
        if (!ev.target.checked) dropSuperuser();
        adminView = ev.target.checked;
        if (window.location.hash === "#/") route();
        else window.location.hash = "#/"; // hashchange routes
    });
    window.addEventListener("hashchange", route);
    window.setInterval(() => { if (!hidden()) refresh(); }, POLL_MS);
    cockpit.addEventListener("visibilitychange", () => { if (!hidden()) refresh(); });
    document.addEventListener("visibilitychange", () => { if (!hidden()) refresh(); });
    route();
}

init();
