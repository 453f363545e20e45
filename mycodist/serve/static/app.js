// Progressive enhancement of the upload form: preview, drag and drop, and an in-page answer from
// POST /api/v1/predict. Every value from the server is set with textContent (never as HTML).
"use strict";

const TITLES = {
  not_identified: "Not identified",
  poisonous: "Poisonous",
  do_not_eat: "Do not eat",
  inedible: "Inedible",
  edible_species: "Edible species (not a safety check)",
};

document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("upload-form");
  const input = document.getElementById("image");
  const drop = document.getElementById("drop-zone");
  const preview = document.getElementById("preview");
  const status = document.getElementById("status");
  const result = document.getElementById("result");
  const submit = document.getElementById("submit");
  let previewUrl = null;

  function showPreview(file) {
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = null;
    preview.hidden = true;
    result.hidden = true;
    status.textContent = "";
    if (!file) return;
    if (!file.type.startsWith("image/")) {
      status.textContent = "That file is not an image.";
      return;
    }
    previewUrl = URL.createObjectURL(file);
    preview.src = previewUrl;
    preview.hidden = false;
  }

  input.addEventListener("change", () => showPreview(input.files[0]));

  ["dragenter", "dragover"].forEach((ev) => drop.addEventListener(ev, (e) => {
    e.preventDefault();
    drop.classList.add("dragging");
  }));
  ["dragleave", "drop"].forEach((ev) => drop.addEventListener(ev, () => drop.classList.remove("dragging")));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    if (!e.dataTransfer || !e.dataTransfer.files.length) return;
    input.files = e.dataTransfer.files;
    showPreview(input.files[0]);
  });

  function render(answer) {
    const code = answer.verdict.code;
    const box = document.getElementById("verdict");
    box.className = "verdict verdict-" + code;
    document.getElementById("verdict-title").textContent = TITLES[code] || code;
    document.getElementById("verdict-message").textContent = answer.verdict.message;
    document.getElementById("warning").lastChild.textContent = " " + answer.warning;
    const reasons = document.getElementById("verdict-reasons");
    reasons.replaceChildren();
    for (const r of answer.verdict.reasons || []) {
      const li = document.createElement("li");
      li.textContent = r;
      reasons.appendChild(li);
    }
    const looks = answer.verdict.lookalikes || [];
    const lookBody = document.querySelector("#lookalikes tbody");
    lookBody.replaceChildren();
    for (const x of looks) {
      const row = document.createElement("tr");
      const name = document.createElement("i");
      name.textContent = x.scientific_name || x.label;
      const prob = x.probability === null ? "not among the model's classes" : (100 * x.probability).toFixed(2) + "%";
      const cells = [name, x.edibility + (x.syndrome ? " (" + x.syndrome + ")" : ""), x.features || "", prob,
        x.citation || ""];
      cells.forEach((c) => {
        const td = document.createElement("td");
        if (typeof c === "string") td.textContent = c; else td.appendChild(c);
        row.appendChild(td);
      });
      lookBody.appendChild(row);
    }
    document.getElementById("lookalikes").hidden = looks.length === 0;
    const body = document.querySelector("#top-k tbody");
    body.replaceChildren();
    for (const t of answer.top_k) {
      const row = document.createElement("tr");
      const sci = document.createElement("i");
      sci.textContent = t.scientific_name;
      const cells = [t.common_name || t.label, sci, t.family || "", t.edibility,
        (100 * t.probability).toFixed(1) + "%"];
      cells.forEach((c, i) => {
        const td = document.createElement("td");
        if (typeof c === "string") td.textContent = c; else td.appendChild(c);
        if (i === 4) td.className = "num";
        row.appendChild(td);
      });
      body.appendChild(row);
    }
    document.getElementById("model-id").textContent = "Model " + answer.model.id + " (mycodist " + answer.model.version + ")";
    result.hidden = false;
    document.getElementById("verdict-title").setAttribute("tabindex", "-1");
    document.getElementById("verdict-title").focus();
  }

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const file = input.files[0];
    if (!file) {
      status.textContent = "Choose a photo first.";
      input.focus();
      return;
    }
    const data = new FormData();
    data.append("image", file, file.name || "photo");
    submit.disabled = true;
    status.textContent = "Checking the photo…";
    result.hidden = true;
    try {
      const resp = await fetch("/api/v1/predict", { method: "POST", body: data });
      const answer = await resp.json();
      if (!resp.ok) {
        status.textContent = "Cannot check this photo: " + (answer.error ? answer.error.message : resp.statusText);
        return;
      }
      status.textContent = "Done.";
      render(answer);
    } catch (err) {
      status.textContent = "The server could not be reached; try again.";
    } finally {
      submit.disabled = false;
    }
  });
});
