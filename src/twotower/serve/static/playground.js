// The playground: talks to this server's own OpenAI-compatible API (POST /v1/completions with
// stream: true); diffusion requests add stream_steps: true to receive every denoising step.
"use strict";

const $ = (id) => document.getElementById(id);

function settings(mode) {
  const body = { prompt: $("prompt").value, mode, stream: true, stream_options: { include_usage: true },
                 max_tokens: Number($("max_tokens").value), temperature: Number($("temperature").value) };
  if (mode !== "ar" && mode !== "mock-ar") {
    body.stream_steps = true;
    body.unmasking = $("unmasking").value;
    for (const name of ["block_size", "steps_per_block", "confidence_threshold"]) {
      if ($(name).value !== "") body[name] = Number($(name).value);
    }
  }
  return body;
}

// Stream one completion; onEvent gets each chunk (text chunks, "twotower.step" chunks, usage).
async function stream(body, onEvent) {
  const headers = { "Content-Type": "application/json" };
  const key = $("api_key").value;
  if (key) headers.Authorization = "Bearer " + key;
  const response = await fetch("/v1/completions", { method: "POST", headers, body: JSON.stringify(body) });
  if (response.status === 401) {
    $("key-label").hidden = false;
    throw new Error("this server needs an API key: enter it above and try again");
  }
  if (!response.ok) throw new Error((await response.json()).error.message);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      if (!event.startsWith("data: ")) continue;
      const data = event.slice(6);
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      onEvent(chunk);
    }
  }
}

// One generation's live figures: tokens/s, tokens per denoiser forward, time to the first block.
function meter() {
  const start = performance.now();
  const m = { first: null, usage: null };
  m.chunk = (chunk) => {
    if (chunk.usage) m.usage = chunk.usage;
    else if (chunk.choices && chunk.choices.length && chunk.choices[0].text && m.first === null) {
      m.first = performance.now() - start;
    }
  };
  m.text = () => {
    const seconds = (performance.now() - start) / 1000;
    const parts = [];
    if (m.usage) {
      parts.push(`${(m.usage.completion_tokens / seconds).toFixed(1)} tokens/s`);
      const perForward = m.usage.tokens_per_denoiser_forward;
      parts.push(`${perForward === null ? "-" : perForward.toFixed(2)} tokens per denoiser forward`);
      parts.push(`${m.usage.completion_tokens} tokens`);
    }
    if (m.first !== null) parts.push(`first block after ${m.first.toFixed(0)} ms`);
    return parts.join(" · ");
  };
  return m;
}

function drawStep(list, chunk) {
  const line = document.createElement("li");
  line.className = "step-line";
  line.dataset.block = chunk.block;
  line.textContent = `block ${chunk.block} step ${chunk.step}: `;
  chunk.tokens.forEach((token, i) => {
    const span = document.createElement("span");
    if (token === null) {
      span.className = "mask";
      span.textContent = "▢";
    } else {
      span.textContent = token;
      if (chunk.committed[i]) span.className = "new";
    }
    line.appendChild(span);
  });
  list.appendChild(line);
  list.scrollTop = list.scrollHeight;
}

function showOutput(element) {
  element.textContent = "";
  const prompt = document.createElement("span");
  prompt.className = "prompt-text";
  prompt.textContent = $("prompt").value;
  const answer = document.createElement("span");
  answer.className = "answer";
  element.append(prompt, answer);
  return answer;
}

async function run(mode, output, figures, steps) {
  const answer = showOutput(output);
  const m = meter();
  figures.textContent = "";
  await stream(settings(mode), (chunk) => {
    m.chunk(chunk);
    if (chunk.object === "twotower.step") {
      if (steps) drawStep(steps, chunk);
    } else if (chunk.choices && chunk.choices.length) {
      answer.textContent += chunk.choices[0].text;
    }
    figures.textContent = m.text();
  });
  figures.textContent = m.text();
  figures.dataset.done = "true";
}

async function guarded(work) {
  $("error").textContent = "";
  for (const b of document.querySelectorAll("button")) b.disabled = true;
  try {
    await work();
  } catch (error) {
    $("error").textContent = error.message;
  } finally {
    for (const b of document.querySelectorAll("button")) b.disabled = false;
  }
}

function generate() {
  return guarded(async () => {
    $("single").hidden = false;
    $("steps").textContent = "";
    $("status").textContent = "generating";
    delete $("figures").dataset.done;
    await run($("mode").value, $("output"), $("figures"), $("steps"));
    $("status").textContent = "done";
  });
}

function race() {
  return guarded(async () => {
    $("racing").hidden = false;
    const lanes = [["lane-left", $("race_left").value], ["lane-right", $("race_right").value]];
    await Promise.all(lanes.map(([id, mode]) => {
      const lane = $(id);
      lane.querySelector("h3").textContent = mode;
      const figures = lane.querySelector(".figures");
      delete figures.dataset.done;
      return run(mode, lane.querySelector(".output"), figures, null);
    }));
  });
}

async function setUp() {
  const options = await (await fetch("/playground.json")).json();
  const fill = (select, names, chosen) => {
    for (const name of names) select.add(new Option(name, name, false, name === chosen));
  };
  fill($("mode"), options.modes, "diffusion");
  fill($("race_left"), options.modes, "ar");
  fill($("race_right"), options.modes, "diffusion");
  fill($("unmasking"), options.unmasking, "confidence");
  for (const name of ["block_size", "steps_per_block", "confidence_threshold"]) $(name).value = options[name];
  $("max_tokens").max = options.max_tokens;
  $("generate").addEventListener("click", generate);
  $("race").addEventListener("click", race);
  document.body.dataset.ready = "true";
}

setUp();
