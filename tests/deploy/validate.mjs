// Offline checks of the deployment files (run by validate.sh, which renders the overlays first).
//
//   node validate.mjs --tools DIR --flags FLAGS.txt --root ROOT manifests OVERLAY RENDERED.yaml
//   node validate.mjs --tools DIR --flags FLAGS.txt --root ROOT dockerfile DOCKERFILE [DEPLOYMENT_OVERLAY.yaml]
//
// FLAGS.txt is the output of `moeserve --helpfull`. Every problem found is printed as
// "FAIL: ..."; the exit code is 1 when there was any.
import fs from "node:fs";
import path from "node:path";
import { createRequire } from "node:module";
import { pathToFileURL } from "node:url";

const argv = process.argv.slice(2);
const opt = {};
while (argv[0]?.startsWith("--")) {
  opt[argv.shift().slice(2)] = argv.shift();
}
const [mode, ...rest] = argv;
const modules = path.resolve(opt.tools, "node_modules");
opt.root = path.resolve(opt.root);
const YAML = createRequire(path.join(modules, "noop.js"))("yaml");

const failures = [];
const fail = (where, message) => failures.push(`${where}: ${message}`);

// --- The server's flags, from `moeserve --helpfull` ------------------------------------------
// Lines look like `    --port (serve: gRPC port.); default: 50051;` (help text may wrap, and
// its default then stands on a later line before the next flag).
const help = fs.readFileSync(opt.flags, "utf8");
const flagDefaults = new Map();
{
  let current = null;
  for (const line of help.split("\n")) {
    const m = /^\s+--([A-Za-z0-9_]+) \(/.exec(line);
    if (m) {
      current = m[1];
      flagDefaults.set(current, undefined);
    }
    const d = /(?:;|^)\s*default: ([^;]*);\s*$/.exec(line);
    if (current && d) flagDefaults.set(current, d[1].replace(/^"(.*)"$/, "$1"));
  }
}
if (!flagDefaults.has("port") || !flagDefaults.has("metrics_port")) {
  fail("moeserve --helpfull", "does not list --port and --metrics_port; cannot check the manifests");
}

// "--name=value" / "--name value" / "--noname" in an argument list -> Map(name -> value).
function parseFlags(args, where) {
  const flags = new Map();
  for (let i = 0; i < args.length; i++) {
    const a = String(args[i]);
    if (a === "serve") continue;
    const m = /^--?([A-Za-z0-9_]+)(?:=(.*))?$/.exec(a);
    if (!m) {
      fail(where, `argument "${a}" is not a --flag`);
      continue;
    }
    let [, name, value] = m;
    if (!flagDefaults.has(name) && name.startsWith("no") && flagDefaults.has(name.slice(2))) {
      name = name.slice(2);
      value = "false";
    }
    if (!flagDefaults.has(name)) {
      fail(where, `unknown flag --${name} (not in \`moeserve --helpfull\`)`);
      continue;
    }
    if (value === undefined && i + 1 < args.length && !String(args[i + 1]).startsWith("-")) {
      value = String(args[++i]);
    }
    flags.set(name, value);
  }
  return flags;
}
const flagValue = (flags, name) => (flags.has(name) ? flags.get(name) : flagDefaults.get(name));

// --- Kubernetes and Prometheus Operator schemas (kubernetes-models) --------------------------
async function schemaValidate(obj, where) {
  const { apiVersion, kind } = obj;
  if (!apiVersion || !kind) return fail(where, "has no apiVersion or kind");
  const file = apiVersion.startsWith("monitoring.coreos.com/")
    ? path.join(modules, "@kubernetes-models/prometheus-operator", apiVersion, `${kind}.js`)
    : path.join(modules, "kubernetes-models", apiVersion, `${kind}.js`);
  if (!fs.existsSync(file)) return fail(where, `no schema for ${apiVersion} ${kind}`);
  const Model = (await import(pathToFileURL(file).href))[kind];
  try {
    new Model(obj).validate();
  } catch (e) {
    fail(where, `schema ${apiVersion} ${kind}: ${e.message}`);
  }
}

const matches = (selector, labels) =>
  selector && Object.keys(selector).length > 0 &&
  Object.entries(selector).every(([k, v]) => labels?.[k] === v);

// --- The rendered manifests of one overlay --------------------------------------------------
async function checkManifests(overlay, file) {
  const docs = YAML.parseAllDocuments(fs.readFileSync(file, "utf8"));
  const objs = [];
  for (const d of docs) {
    if (d.errors.length) fail(file, `YAML: ${d.errors[0].message}`);
    const o = d.toJS();
    if (o) objs.push(o);
  }
  const name = (o) => `${overlay}: ${o.kind}/${o.metadata?.name}`;
  for (const o of objs) await schemaValidate(o, name(o));
  const ofKind = (k) => objs.filter((o) => o.kind === k);

  // Every kind the deployment needs is there.
  for (const k of ["Deployment", "Service", "ServiceMonitor", "PodDisruptionBudget",
                   "HorizontalPodAutoscaler", "ConfigMap"]) {
    if (ofKind(k).length === 0) fail(overlay, `no ${k}`);
  }
  const deployments = ofKind("Deployment");
  if (deployments.length !== 1) return fail(overlay, `expected one Deployment, got ${deployments.length}`);
  const dep = deployments[0];
  const where = name(dep);
  const pod = dep.spec?.template?.spec ?? {};
  const podLabels = dep.spec?.template?.metadata?.labels ?? {};
  if (!matches(dep.spec?.selector?.matchLabels, podLabels)) fail(where, "selector does not match the pod labels");
  const c = (pod.containers ?? [])[0];
  if (!c) return fail(where, "no container");

  const flags = parseFlags(c.args ?? [], `${where} args`);
  if (c.command) fail(where, "sets command; it must keep the image's ENTRYPOINT `moeserve serve`");
  const grpcPort = Number(flagValue(flags, "port"));
  const metricsPort = Number(flagValue(flags, "metrics_port"));
  const drain = Number(flagValue(flags, "drain_grace_seconds"));
  if (!(grpcPort > 0)) fail(where, "--port must be a fixed port (not 0) behind probes and Services");

  // Ports: the container's named ports are the ports the server listens on.
  const portsByName = new Map((c.ports ?? []).map((p) => [p.name, p.containerPort]));
  if (portsByName.get("grpc") !== grpcPort) fail(where, `containerPort grpc is ${portsByName.get("grpc")}, the server listens on ${grpcPort}`);
  if (metricsPort > 0 && portsByName.get("metrics") !== metricsPort) fail(where, `containerPort metrics is ${portsByName.get("metrics")}, the server's /metrics is on ${metricsPort}`);

  // Probes: native gRPC on the server's port.
  for (const kind of ["startupProbe", "livenessProbe", "readinessProbe"]) {
    const p = c[kind];
    if (!p) { fail(where, `no ${kind}`); continue; }
    if (!p.grpc) { fail(where, `${kind} is not a native gRPC probe`); continue; }
    if (p.grpc.port !== grpcPort) fail(where, `${kind} probes port ${p.grpc.port}, the server listens on ${grpcPort}`);
  }
  const sp = c.startupProbe ?? {};
  const startupBudget = (sp.initialDelaySeconds ?? 0) + (sp.periodSeconds ?? 10) * (sp.failureThreshold ?? 3);
  if (startupBudget < 900) fail(where, `startupProbe allows ${startupBudget} s to load the model; at least 900 s needed for a 32 GB checkpoint`);

  // Drain: SIGTERM comes after preStop; the kubelet kills after terminationGracePeriodSeconds.
  const preStop = c.lifecycle?.preStop;
  let preStopSeconds = 0;
  if (preStop?.exec?.command?.[0] === "sleep") preStopSeconds = Number(preStop.exec.command[1]);
  if (preStop?.sleep) preStopSeconds = Number(preStop.sleep.seconds);
  const grace = pod.terminationGracePeriodSeconds ?? 30;
  if (!(grace >= preStopSeconds + drain + 10)) {
    fail(where, `terminationGracePeriodSeconds ${grace} < preStop ${preStopSeconds} s + --drain_grace_seconds ${drain} + 10 s margin`);
  }

  // Security: non-root, read-only root file system with an emptyDir /tmp.
  if (pod.securityContext?.runAsNonRoot !== true && c.securityContext?.runAsNonRoot !== true) fail(where, "not runAsNonRoot");
  if (c.securityContext?.readOnlyRootFilesystem !== true) fail(where, "root file system not read-only");
  const volumes = new Map((pod.volumes ?? []).map((v) => [v.name, v]));
  const mounts = c.volumeMounts ?? [];
  const tmp = mounts.find((m) => m.mountPath === "/tmp");
  if (!tmp || !volumes.get(tmp.name)?.emptyDir) fail(where, "/tmp is not an emptyDir");
  for (const m of mounts) {
    if (!volumes.has(m.name)) fail(where, `volumeMount ${m.name} has no volume`);
    const v = volumes.get(m.name);
    if (v?.persistentVolumeClaim && !(m.readOnly && v.persistentVolumeClaim.readOnly)) {
      fail(where, `PersistentVolumeClaim volume ${m.name} is not mounted read-only`);
    }
  }

  // The model: the gpu overlay reads a PVC at --model_dir and takes a GPU; cpu-demo neither.
  const modelDir = flags.get("model_dir");
  const gpus = c.resources?.limits?.["nvidia.com/gpu"];
  if (modelDir) {
    const m = mounts.find((x) => x.mountPath === modelDir);
    if (!m || !volumes.get(m.name)?.persistentVolumeClaim) fail(where, `--model_dir=${modelDir} is not a PersistentVolumeClaim mount`);
    const claim = m && volumes.get(m.name)?.persistentVolumeClaim?.claimName;
    if (claim && !ofKind("PersistentVolumeClaim").some((p) => p.metadata.name === claim)) fail(where, `claim ${claim} is not in the overlay`);
  }
  if (overlay === "gpu") {
    if (!modelDir) fail(where, "gpu overlay without --model_dir");
    if (!(Number(gpus) >= 1)) fail(where, "gpu overlay without an nvidia.com/gpu limit");
    if (!(pod.tolerations ?? []).some((t) => t.key === "nvidia.com/gpu")) fail(where, "gpu overlay without a toleration for GPU nodes");
  }
  if (overlay === "cpu-demo") {
    if (modelDir) fail(where, "cpu-demo must run the demo model (no --model_dir)");
    if (gpus) fail(where, "cpu-demo must not ask for a GPU");
  }
  if (!c.resources?.requests?.cpu || !c.resources?.requests?.memory) fail(where, "no cpu and memory requests");

  // Services select the pods and reach the named container ports; the gRPC port says so.
  const services = ofKind("Service");
  for (const s of services) {
    const w = name(s);
    if (!matches(s.spec?.selector, podLabels)) fail(w, "selector does not match the Deployment's pods");
    for (const p of s.spec?.ports ?? []) {
      const target = typeof p.targetPort === "string" ? portsByName.get(p.targetPort) : (p.targetPort ?? p.port);
      if (target === undefined || ![...portsByName.values()].includes(target)) fail(w, `port ${p.name} targets ${p.targetPort}, which the container does not expose`);
      if (target === grpcPort && (p.name !== "grpc" || p.appProtocol !== "grpc")) fail(w, "the gRPC port must be named grpc with appProtocol grpc");
    }
    if (!(s.spec?.ports ?? []).some((p) => p.name === "grpc")) fail(w, "no grpc port");
  }
  if (!services.some((s) => s.spec?.clusterIP === "None")) fail(overlay, "no headless Service (clusterIP: None)");
  if (!services.some((s) => s.spec?.clusterIP !== "None")) fail(overlay, "no ClusterIP Service");

  // ServiceMonitor: exactly one Service with a port named like its endpoint (no double scrape).
  for (const sm of ofKind("ServiceMonitor")) {
    const w = name(sm);
    for (const ep of sm.spec?.endpoints ?? []) {
      const hits = services.filter((s) => matches(sm.spec?.selector?.matchLabels, s.metadata?.labels) &&
                                          (s.spec?.ports ?? []).some((p) => p.name === ep.port));
      if (hits.length !== 1) fail(w, `endpoint port ${ep.port} matches ${hits.length} Services, expected 1`);
      if ((ep.path ?? "/metrics") !== "/metrics") fail(w, `path ${ep.path} is not /metrics`);
      const svcPort = hits[0]?.spec.ports.find((p) => p.name === ep.port);
      const target = svcPort && (typeof svcPort.targetPort === "string" ? portsByName.get(svcPort.targetPort) : svcPort.targetPort);
      if (hits.length === 1 && target !== metricsPort) fail(w, `scrapes container port ${target}, /metrics is on ${metricsPort}`);
    }
  }

  for (const pdb of ofKind("PodDisruptionBudget")) {
    if (!matches(pdb.spec?.selector?.matchLabels, podLabels)) fail(name(pdb), "selector does not match the Deployment's pods");
  }

  // HPA: scales this Deployment on the Pods metric that the adapter rule provides.
  const adapter = YAML.parse(fs.readFileSync(path.join(opt.root, "deploy/k8s/prometheus-adapter-rules.yaml"), "utf8"));
  const adapterMetrics = (adapter?.rules?.custom ?? []).map((r) => r.name?.as);
  for (const hpa of ofKind("HorizontalPodAutoscaler")) {
    const w = name(hpa);
    const t = hpa.spec?.scaleTargetRef ?? {};
    if (t.kind !== "Deployment" || t.name !== dep.metadata.name) fail(w, `scales ${t.kind}/${t.name}, not the Deployment`);
    const pods = (hpa.spec?.metrics ?? []).filter((m) => m.type === "Pods");
    if (!pods.some((m) => m.pods?.metric?.name === "moeserve_requests_waiting")) fail(w, "no Pods metric moeserve_requests_waiting");
    for (const m of pods) {
      if (!adapterMetrics.includes(m.pods?.metric?.name)) fail(w, `metric ${m.pods?.metric?.name} is not provided by prometheus-adapter-rules.yaml`);
    }
    if (dep.spec?.replicas !== undefined) fail(where, "sets replicas although the HPA owns them");
  }

  // The Grafana dashboard ConfigMap for the sidecar.
  const dashboards = ofKind("ConfigMap").filter((cm) => cm.metadata?.labels?.grafana_dashboard === "1");
  if (dashboards.length === 0) fail(overlay, 'no ConfigMap labelled grafana_dashboard: "1"');
  for (const cm of dashboards) {
    for (const [k, v] of Object.entries(cm.data ?? {})) {
      try { JSON.parse(v); } catch (e) { fail(name(cm), `${k} is not JSON: ${e.message}`); }
    }
  }
  return dep;
}

// --- The Dockerfile, statically -------------------------------------------------------------
function checkDockerfile(file, deploymentYaml) {
  const text = fs.readFileSync(file, "utf8").replace(/\\\n/g, " ");
  const lines = text.split("\n").map((l) => l.trim()).filter((l) => l && !l.startsWith("#"));
  const where = path.relative(opt.root, file);
  const stages = lines.filter((l) => /^FROM\s/i.test(l));
  if (stages.length < 2) fail(where, "not multi-stage");
  // Files copied from the build context (the repository root) exist.
  for (const l of lines.filter((l) => /^COPY\s/i.test(l))) {
    const words = l.split(/\s+/).slice(1).filter((w) => !w.startsWith("--"));
    if (/--from=/.test(l)) continue;
    for (const src of words.slice(0, -1)) {
      if (!fs.existsSync(path.join(opt.root, src))) fail(where, `COPY ${src}: no such file in the build context`);
    }
  }
  // The configure step: the README's cmake options, plus only options CMakeLists.txt declares.
  const readme = fs.readFileSync(path.join(opt.root, "README.md"), "utf8");
  const readmeConfigure = /cmake -S \. -B build([^&\n]*)/.exec(readme);
  const dockerConfigure = /cmake -S \. -B build([^&\n]*)/.exec(text);
  if (!readmeConfigure) fail("README.md", "no `cmake -S . -B build` command");
  if (!dockerConfigure) fail(where, "no `cmake -S . -B build` configure step");
  if (readmeConfigure && dockerConfigure) {
    const readmeOpts = readmeConfigure[1].trim().split(/\s+/).filter(Boolean);
    const dockerOpts = dockerConfigure[1].trim().split(/\s+/).filter(Boolean);
    const joined = ` ${dockerOpts.join(" ")} `;
    for (let i = 0; i < readmeOpts.length; i++) {
      const o = readmeOpts[i].startsWith("-D") || !readmeOpts[i].startsWith("-") ? readmeOpts[i]
        : `${readmeOpts[i]} ${readmeOpts[++i] ?? ""}`;
      if (!joined.includes(` ${o} `)) fail(where, `configure step lacks the README's option ${o}`);
    }
    const cmakeLists = fs.readFileSync(path.join(opt.root, "CMakeLists.txt"), "utf8");
    for (const o of dockerOpts.filter((o) => o.startsWith("-D"))) {
      const v = /^-D([A-Za-z0-9_]+)(?::[A-Z]+)?=/.exec(o)?.[1];
      const known = v && (v === "CMAKE_BUILD_TYPE" ||
        new RegExp(`option\\(${v}\\b|set\\(${v}\\b[^)]*CACHE`).test(cmakeLists));
      if (!known) fail(where, `configure option ${o} is not an option of CMakeLists.txt`);
    }
  }
  // ENTRYPOINT runs `moeserve serve`; flags in ENTRYPOINT/CMD exist; EXPOSE has the default ports.
  const entry = lines.find((l) => /^ENTRYPOINT\s/i.test(l));
  let entryArgs = [];
  try { entryArgs = JSON.parse(entry.replace(/^ENTRYPOINT\s+/i, "")); } catch { fail(where, "ENTRYPOINT is not in JSON form"); }
  if (entryArgs[0] !== "moeserve" || entryArgs[1] !== "serve") fail(where, 'ENTRYPOINT is not ["moeserve", "serve", ...]');
  const cmd = lines.find((l) => /^CMD\s/i.test(l));
  let cmdArgs = [];
  if (cmd) { try { cmdArgs = JSON.parse(cmd.replace(/^CMD\s+/i, "")); } catch { fail(where, "CMD is not in JSON form"); } }
  const flags = parseFlags([...entryArgs.slice(2), ...cmdArgs], `${where} ENTRYPOINT/CMD`);
  const exposed = lines.filter((l) => /^EXPOSE\s/i.test(l)).flatMap((l) => l.split(/\s+/).slice(1)).map((p) => Number(p.split("/")[0]));
  for (const f of ["port", "metrics_port"]) {
    if (!exposed.includes(Number(flagValue(flags, f)))) fail(where, `EXPOSE lacks --${f}'s ${flagValue(flags, f)}`);
  }
  // A non-root numeric USER, the same uid as the Deployment's runAsUser.
  const user = lines.filter((l) => /^USER\s/i.test(l)).pop()?.split(/\s+/)[1]?.split(":")[0];
  if (!user || !/^\d+$/.test(user) || user === "0") fail(where, `USER ${user} is not a numeric non-root uid`);
  if (deploymentYaml) {
    const dep = YAML.parseAllDocuments(fs.readFileSync(deploymentYaml, "utf8")).map((d) => d.toJS()).find((o) => o?.kind === "Deployment");
    const uid = dep?.spec?.template?.spec?.securityContext?.runAsUser;
    if (String(uid) !== user) fail(where, `USER ${user} differs from the Deployment's runAsUser ${uid}`);
  }
  if (!/VOLUME\s+\[?"?\/models/.test(text)) fail(where, "no /models volume");
}

if (mode === "manifests") {
  await checkManifests(rest[0], rest[1]);
} else if (mode === "dockerfile") {
  checkDockerfile(rest[0], rest[1]);
} else {
  fail("validate.mjs", `unknown mode ${mode}`);
}
for (const f of failures) console.log(`FAIL: ${f}`);
process.exit(failures.length ? 1 : 0);
