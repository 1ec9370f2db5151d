// The page's whole logic: fill the form from the API, post txt2img, poll /progress while it runs, show the
// images with their parameters. Plain browser JavaScript, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const API = "/sdapi/v1";

async function getJSON(path) {
  const response = await fetch(API + path);
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

function option(select, value, label) {
  const o = document.createElement("option");
  o.value = value;
  o.textContent = label || value;
  select.appendChild(o);
}

async function init() {
  const [samplers, schedulers, loras, options] = await Promise.all(
    ["/samplers", "/schedulers", "/loras", "/options"].map(getJSON));
  samplers.forEach((s) => option($("sampler_name"), s.name));
  $("sampler_name").value = "Euler a";
  schedulers.forEach((s) => option($("scheduler"), s.name, s.label));
  $("model").textContent = options.sd_model_checkpoint || "";
  if (loras.length) $("loras").querySelector(".none").remove();
  for (const lora of loras) {
    const label = document.createElement("label");
    label.className = "lora";
    label.innerHTML = '<input type="checkbox"> <span></span> <input type="number" step="0.1" value="1">';
    label.querySelector("span").textContent = lora.name;
    label.dataset.name = lora.name;
    $("loras").appendChild(label);
  }
}

function payload() {
  let prompt = $("prompt").value;
  for (const label of $("loras").querySelectorAll("label.lora")) {
    const [check, weight] = label.querySelectorAll("input");
    if (check.checked) prompt += ` <lora:${label.dataset.name}:${weight.value}>`;
  }
  const number = (id) => Number($(id).value);
  return {
    prompt, negative_prompt: $("negative_prompt").value, steps: number("steps"), cfg_scale: number("cfg_scale"),
    seed: number("seed"), width: number("width"), height: number("height"), batch_size: number("batch_size"),
    sampler_name: $("sampler_name").value, scheduler: $("scheduler").value,
  };
}

function setProgress(fraction) {
  const percent = Math.round(Math.min(Math.max(fraction, 0), 1) * 100);
  $("bar").style.width = percent + "%";
  $("percent").textContent = percent + "%";
  $("progress").setAttribute("aria-valuenow", String(percent));
}

function errorText(status, body) {
  if (body && Array.isArray(body.detail)) {
    return body.detail.map((d) => `${(d.loc || []).slice(1).join(".")}: ${d.msg}`).join("\n");
  }
  return (body && (body.detail || body.error)) || `HTTP ${status}`;
}

function show(result) {
  const info = JSON.parse(result.info);
  $("grid").replaceChildren(...result.images.map((b64, i) => {
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.src = "data:image/png;base64," + b64;
    img.alt = `image ${i + 1}, seed ${info.all_seeds[i]}`;
    const caption = document.createElement("figcaption");
    caption.textContent = info.infotexts[i];
    figure.append(img, caption);
    return figure;
  }));
}

async function poll(running) {
  while (running.on) {
    try {
      const p = await getJSON("/progress");
      if (running.on && p.state.job_count > 0) {
        setProgress(p.progress);
        if (p.current_image) {
          $("preview").src = "data:image/png;base64," + p.current_image;
          $("preview").hidden = false;
        }
      }
    } catch (e) { /* the next poll tries again */ }
    await new Promise((resolve) => setTimeout(resolve, 250));
  }
}

async function generate(event) {
  event.preventDefault();
  $("error").textContent = "";
  $("generate").disabled = true;
  $("interrupt").disabled = false;
  setProgress(0);
  const running = { on: true };
  poll(running);
  try {
    const response = await fetch(API + "/txt2img", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(payload()),
    });
    const body = await response.json().catch(() => null);
    if (!response.ok) throw new Error(errorText(response.status, body));
    running.on = false;
    setProgress(1);
    show(body);
  } catch (e) {
    $("error").textContent = e.message;
  } finally {
    running.on = false;
    $("preview").hidden = true;
    $("generate").disabled = false;
    $("interrupt").disabled = true;
  }
}

$("form").addEventListener("submit", generate);
$("interrupt").addEventListener("click", () => fetch(API + "/interrupt", { method: "POST" }));
init().catch((e) => { $("error").textContent = "could not load the form: " + e.message; });
