// The canvas both pose panels draw on (Stage: a faint copy of the source, coordinates in its pixels) and the joint
// editor (JointEditor: the 18 OpenPose COCO joints, dragged with the pointer, hidden or shown).
// Keypoint coordinates are pixels of the source image with pixel centres at integers, as in OpenPose JSON.

const MAX_CSS_WIDTH = 384;
const MAX_CSS_HEIGHT = 480;
const JOINT_RADIUS = 5;   // CSS pixels
const GRAB_RADIUS = 14;   // a press this close to a joint grabs it

export class Stage {
  constructor(canvas) {
    this.canvas = canvas;
    this.ctx = canvas.getContext("2d");
    this.image = null;
    this.setFrame(64, 64, null);
  }

  // The source's size in pixels and its picture (an <img>, or null for a blank frame).
  setFrame(width, height, image) {
    this.width = width;
    this.height = height;
    this.image = image;
    this.scale = Math.min(MAX_CSS_WIDTH / width, MAX_CSS_HEIGHT / height);
    const dpr = window.devicePixelRatio || 1;
    this.canvas.style.width = `${width * this.scale}px`;
    this.canvas.style.height = `${height * this.scale}px`;
    this.canvas.width = Math.round(width * this.scale * dpr);
    this.canvas.height = Math.round(height * this.scale * dpr);
    this.ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  }

  // A pointer event -> [x, y] in source pixels (clamped to the image).
  toImage(event) {
    const rect = this.canvas.getBoundingClientRect();
    const x = (event.clientX - rect.left) * this.width / rect.width - 0.5;
    const y = (event.clientY - rect.top) * this.height / rect.height - 0.5;
    return [clamp(x, 0, this.width - 1), clamp(y, 0, this.height - 1)];
  }

  // Source pixels -> CSS pixels on the canvas.
  toCanvas(x, y) {
    return [(x + 0.5) * this.scale, (y + 0.5) * this.scale];
  }

  clear() {
    const { ctx } = this;
    ctx.clearRect(0, 0, this.width * this.scale, this.height * this.scale);
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, this.width * this.scale, this.height * this.scale);
    if (this.image) {
      ctx.globalAlpha = 0.35;
      ctx.imageSmoothingEnabled = false;
      ctx.drawImage(this.image, 0, 0, this.width * this.scale, this.height * this.scale);
      ctx.globalAlpha = 1;
    }
  }
}

export function clamp(v, low, high) {
  return Math.min(Math.max(v, low), high);
}

export class JointEditor {
  // skeleton: /api/info's {names, limbs, colors, standing (unit-square pose), fill}; onChange(editor) after edits.
  constructor(canvas, skeleton, onChange) {
    this.stage = new Stage(canvas);
    this.skeleton = skeleton;
    this.onChange = onChange;
    this.points = [];   // [x, y] per joint (kept while hidden)
    this.visible = [];
    this.dragging = null;
    canvas.addEventListener("pointerdown", (e) => this.press(e));
    canvas.addEventListener("pointermove", (e) => this.move(e));
    canvas.addEventListener("pointerup", (e) => this.release(e));
    canvas.addEventListener("pointercancel", (e) => this.release(e));
    canvas.addEventListener("dblclick", (e) => {
      const joint = this.jointAt(e);
      if (joint !== null) this.setVisible(joint, !this.visible[joint]);
    });
    this.standing();
  }

  setFrame(width, height, image) {
    this.stage.setFrame(width, height, image);
    this.standing();
  }

  // The standing pose in a centred square of `fill` times the shorter side (as pmf_jax/serve/standing_pose.py).
  standing() {
    const { width, height } = this.stage;
    const side = this.skeleton.fill * Math.min(width, height);
    const ox = (width - side) / 2, oy = (height - side) / 2;
    this.setKeypoints(this.skeleton.standing.map(([u, v]) => [ox + u * side - 0.5, oy + v * side - 0.5, 1]));
  }

  // keypoints: 18 [x, y, confidence]; confidence 0 hides a joint (a hidden one at 0, 0 is put at the centre).
  setKeypoints(keypoints) {
    const { width, height } = this.stage;
    this.points = keypoints.map(([x, y, c]) => (c > 0 ? [x, y] : [(width - 1) / 2, (height - 1) / 2]));
    this.visible = keypoints.map(([, , c]) => c > 0);
    this.changed();
  }

  setVisible(joint, visible) {
    this.visible[joint] = visible;
    this.changed();
  }

  keypoints() {
    return this.points.map(([x, y], j) => (this.visible[j] ? [round2(x), round2(y), 1] : [0, 0, 0]));
  }

  openPose() {
    return {
      people: [{ pose_keypoints_2d: this.keypoints().flat() }],
      canvas_width: this.stage.width,
      canvas_height: this.stage.height,
    };
  }

  jointAt(event) {
    const rect = this.stage.canvas.getBoundingClientRect();
    const px = event.clientX - rect.left, py = event.clientY - rect.top;
    let best = null, bestDistance = GRAB_RADIUS;
    this.points.forEach(([x, y], j) => {
      const [cx, cy] = this.stage.toCanvas(x, y);
      const d = Math.hypot(cx - px, cy - py);
      if (d <= bestDistance) { best = j; bestDistance = d; }
    });
    return best;
  }

  press(event) {
    const joint = this.jointAt(event);
    if (joint === null) return;
    const [x, y] = this.stage.toImage(event);
    // The joint keeps its offset from the pointer, so it moves exactly as far as the pointer does.
    this.dragging = { joint, dx: this.points[joint][0] - x, dy: this.points[joint][1] - y };
    this.stage.canvas.setPointerCapture(event.pointerId);
    event.preventDefault();
  }

  move(event) {
    if (!this.dragging) return;
    const [x, y] = this.stage.toImage(event);
    const { joint, dx, dy } = this.dragging;
    this.points[joint] = [clamp(x + dx, 0, this.stage.width - 1), clamp(y + dy, 0, this.stage.height - 1)];
    this.changed();
  }

  release() {
    this.dragging = null;
  }

  changed() {
    this.draw();
    if (this.onChange) this.onChange(this);
  }

  draw() {
    const { stage, skeleton } = this;
    const { ctx } = stage;
    stage.clear();
    ctx.lineWidth = 4;
    ctx.lineCap = "round";
    skeleton.limbs.forEach(([a, b], i) => {
      if (!this.visible[a] || !this.visible[b]) return;
      const [r, g, bl] = skeleton.colors[i];
      ctx.strokeStyle = `rgba(${r}, ${g}, ${bl}, 0.8)`;
      ctx.beginPath();
      ctx.moveTo(...stage.toCanvas(...this.points[a]));
      ctx.lineTo(...stage.toCanvas(...this.points[b]));
      ctx.stroke();
    });
    this.points.forEach(([x, y], j) => {
      const [cx, cy] = stage.toCanvas(x, y);
      ctx.beginPath();
      ctx.arc(cx, cy, JOINT_RADIUS, 0, 2 * Math.PI);
      if (this.visible[j]) {
        ctx.fillStyle = `rgb(${skeleton.colors[j].join(",")})`;
        ctx.fill();
        ctx.lineWidth = 1;
        ctx.strokeStyle = "#000";
      } else {
        ctx.lineWidth = 1.5;
        ctx.strokeStyle = "#888";
      }
      ctx.stroke();
    });
  }
}

function round2(v) {
  return Math.round(v * 100) / 100;
}
