// The playground: one conversation, two models answering side by side, each reply streamed from
// /playground/chat (the API's chat completions, SSE chunks ending in "data: [DONE]").
"use strict";
(function () {
  const form = document.getElementById("playground");
  const sides = {
    base: { select: document.getElementById("base-model"), list: document.getElementById("turns-base"), history: [] },
    tuned: { select: document.getElementById("tuned-model"), list: document.getElementById("turns-tuned"), history: [] },
  };
  const send = document.getElementById("send");

  function showModels() {
    for (const [name, side] of Object.entries(sides)) {
      const section = document.querySelector(`.side[data-side="${name}"]`);
      section.querySelector(".side-model").textContent = side.select.value || "(none)";
    }
  }

  function addTurn(list, role, text) {
    const li = document.createElement("li");
    li.className = role;
    li.textContent = text;
    list.appendChild(li);
    return li;
  }

  function settings() {
    const body = {
      temperature: Number(document.getElementById("temperature").value),
      max_tokens: Number(document.getElementById("max-tokens").value),
      stream: true,
    };
    const seed = document.getElementById("seed").value;
    if (seed !== "") body.seed = Number(seed);
    return body;
  }

  async function answer(side, body) {
    const li = addTurn(side.list, "assistant", "");
    li.dataset.state = "streaming";
    let text = "";
    try {
      const response = await fetch("/playground/chat", {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
        body: JSON.stringify(body),
        credentials: "same-origin",
      });
      if (!response.ok) {
        let message = `HTTP ${response.status}`;
        try { message = (await response.json()).error.message; } catch (e) { /* not JSON */ }
        throw new Error(message);
      }
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          for (const line of event.split("\n")) {
            if (!line.startsWith("data:")) continue;
            const data = line.slice(5).trim();
            if (data === "[DONE]") { li.dataset.state = "done"; continue; }
            const chunk = JSON.parse(data);
            if (chunk.error) throw new Error(chunk.error.message);
            for (const choice of chunk.choices || []) {
              if (choice.delta && choice.delta.content) {
                text += choice.delta.content;
                li.textContent = text;
              }
              if (choice.finish_reason) li.dataset.finishReason = choice.finish_reason;
            }
          }
        }
      }
      if (li.dataset.state !== "done") throw new Error("the stream ended early");
      side.history.push({ role: "assistant", content: text });
    } catch (err) {
      li.className = "assistant error";
      li.dataset.state = "error";
      li.textContent = `${text}${text ? "\n" : ""}error: ${err.message}`;
    }
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const box = document.getElementById("message");
    const message = box.value.trim();
    if (!message) return;
    box.value = "";
    send.disabled = true;
    showModels();
    const system = document.getElementById("system").value.trim();
    const common = settings();
    const runs = [];
    for (const side of Object.values(sides)) {
      side.history.push({ role: "user", content: message });
      addTurn(side.list, "user", message);
      const messages = (system ? [{ role: "system", content: system }] : []).concat(side.history);
      runs.push(answer(side, { ...common, model: side.select.value, messages }));
    }
    await Promise.all(runs);
    send.disabled = false;
  });

  document.getElementById("reset").addEventListener("click", () => {
    for (const side of Object.values(sides)) { side.history = []; side.list.replaceChildren(); }
  });
  for (const side of Object.values(sides)) side.select.addEventListener("change", showModels);
  showModels();
})();
