// The medlens viewer: the job's image with its predicted segmentation (red) and uncertainty (blue) overlays.
// Everything is fetched from this server: NiiVue from /static/niivue/, the images from /viewer/<job>/files/
// with the viewer's cookie. body[data-state] says where the page is (loading, waiting, ready, failed, error),
// so a test or a person can tell.
"use strict";
(function () {
  const body = document.body;
  const job = body.dataset.job;
  const base = "/viewer/" + job;
  const stateEl = document.getElementById("state");
  function setState(state, message) {
    body.dataset.state = state;
    stateEl.textContent = message;
  }
  window.addEventListener("error", function (e) {
    setState("error", "error: " + e.message);
  });
  window.addEventListener("unhandledrejection", function (e) {
    setState("error", "error: " + (e.reason && e.reason.message ? e.reason.message : e.reason));
  });
  function sleep(ms) {
    return new Promise(function (resolve) { setTimeout(resolve, ms); });
  }
  async function status() {
    for (;;) {
      const r = await fetch(base + "/status", { credentials: "same-origin", cache: "no-store" });
      if (!r.ok) throw new Error("status " + r.status + " (open the viewer again through POST /jobs/" + job + "/viewer)");
      const s = await r.json();
      if (s.state === "done" || s.state === "failed") return s;
      setState("waiting", "job " + s.state + "...");
      await sleep(1000);
    }
  }
  async function main() {
    const s = await status();
    if (s.state === "failed") {
      setState("failed", "the job failed: " + s.error);
      return;
    }
    // A thin green crosshair: red is reserved for the segmentation, blue for the uncertainty.
    const nv = new niivue.Niivue({ backColor: [0.07, 0.07, 0.07, 1], show3Dcrosshair: false, isColorbar: false,
                                   crosshairColor: [0.2, 0.9, 0.3, 0.8], crosshairWidth: 0.5,
                                   crosshairWidthUnit: "percent" });
    await nv.attachTo("gl");
    const volumes = [{ url: base + "/files/image.nii.gz", colormap: "gray" }];
    const opacity = parseFloat(document.getElementById("opacity").value);
    const layers = {};
    if (s.files.indexOf("label.nii.gz") >= 0) {
      layers.label = volumes.length;
      volumes.push({ url: base + "/files/label.nii.gz", colormap: "red", opacity: opacity,
                     cal_min: 0.5, cal_max: Math.max(1, s.max_label) });
    }
    if (s.files.indexOf("uncertainty.nii.gz") >= 0) {
      layers.uncertainty = volumes.length;
      volumes.push({ url: base + "/files/uncertainty.nii.gz", colormap: "blue", opacity: opacity * 0.7 });
    }
    await nv.loadVolumes(volumes);
    if (layers.uncertainty !== undefined) {
      // Show where the model is unsure, not the faint uncertainty every voxel has.
      const v = nv.volumes[layers.uncertainty];
      const hi = v.global_max || v.robust_max || 1;
      v.cal_min = 0.25 * hi;
      v.cal_max = hi;
      nv.updateGLVolume();
    }
    nv.setSliceType(nv.sliceTypeMultiplanar);
    const showLabel = document.getElementById("show-label");
    const showUnc = document.getElementById("show-uncertainty");
    const slider = document.getElementById("opacity");
    showUnc.disabled = layers.uncertainty === undefined;
    showUnc.checked = layers.uncertainty !== undefined;
    function apply() {
      const a = parseFloat(slider.value);
      if (layers.label !== undefined) nv.setOpacity(layers.label, showLabel.checked ? a : 0);
      if (layers.uncertainty !== undefined) nv.setOpacity(layers.uncertainty, showUnc.checked ? a * 0.7 : 0);
    }
    [showLabel, showUnc, slider].forEach(function (el) { el.addEventListener("input", apply); });
    apply();
    const parts = ["image"].concat(Object.keys(layers));
    setState("ready", s.model + ": " + parts.join(" + ") + (s.refer ? " - REFER: uncertain, needs a human read" : ""));
  }
  main().catch(function (e) { setState("error", "error: " + e.message); });
})();
