// The stick-figure canvas: strokes drawn with the pointer, in source pixels, sent to POST /api/fit-doodle.

import { Stage } from "./editor.js";

export class Doodle {
  constructor(canvas) {
    this.stage = new Stage(canvas);
    this.strokes = [];     // each a list of [x, y] in source pixels
    this.drawing = false;
    canvas.addEventListener("pointerdown", (e) => {
      this.drawing = true;
      this.strokes.push([this.stage.toImage(e)]);
      canvas.setPointerCapture(e.pointerId);
      this.draw();
      e.preventDefault();
    });
    canvas.addEventListener("pointermove", (e) => {
      if (!this.drawing) return;
      this.strokes[this.strokes.length - 1].push(this.stage.toImage(e));
      this.draw();
    });
    const end = () => { this.drawing = false; };
    canvas.addEventListener("pointerup", end);
    canvas.addEventListener("pointercancel", end);
    this.draw();
  }

  setFrame(width, height, image) {
    this.stage.setFrame(width, height, image);
    this.clear();
  }

  clear() {
    this.strokes = [];
    this.draw();
  }

  // The body of POST /api/fit-doodle.
  request() {
    const round = (v) => Math.round(v * 100) / 100;
    return {
      strokes: this.strokes.map((s) => s.map(([x, y]) => [round(x), round(y)])),
      width: this.stage.width,
      height: this.stage.height,
    };
  }

  draw() {
    const { stage } = this;
    const { ctx } = stage;
    stage.clear();
    ctx.strokeStyle = "#111";
    ctx.lineWidth = 3;
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    for (const stroke of this.strokes) {
      ctx.beginPath();
      stroke.forEach(([x, y], i) => (i ? ctx.lineTo(...stage.toCanvas(x, y)) : ctx.moveTo(...stage.toCanvas(x, y))));
      if (stroke.length === 1) ctx.lineTo(...stage.toCanvas(...stroke[0]));
      ctx.stroke();
    }
  }
}
