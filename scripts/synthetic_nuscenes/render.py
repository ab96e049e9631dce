"""Camera and LiDAR rendering for the synthetic nuScenes writer (``synthetic_nuscenes.writer``).

The world is a flat ground plane (global z = 0) with oriented boxes standing on it. Frames follow nuScenes:
global/ego x forward, y left, z up; box-local x along the length; camera x right, y down, z forward.

* Cameras (``CameraRenderer``): the ground is textured in *global* coordinates (1 m tiles of mild brightness
  noise, darker lines every 5 m, contrast fading with distance) so it stays fixed in the world while the ego
  moves, which makes perspective and depth perceivable; the sky is a pale gradient. Each box is drawn face by
  face with ``cv2.fillConvexPoly`` (painter's algorithm, far boxes first; back faces culled; faces clipped at
  a near plane so boxes beside or behind the camera stay correct), each face shaded by a fixed global light.
  The front face (box-local +x, the heading) carries a dark inset panel (a "windscreen") so heading is
  visible, as it is on real objects; without it front and back look alike and yaw is ambiguous by 180 deg.
  The ground's per-pixel ego coordinates only depend on the fixed camera extrinsics, so they are computed
  once per camera and each frame only rotates/translates them.
* LiDAR (``LidarScanner``): one ray per ring and azimuth step, intersected with the ground plane and every box
  (vectorised slab test); the nearest hit within ``max_range`` gives a point with a class-dependent intensity.
"""
import cv2
import numpy as np

# Fixed global light (from above, slightly front-left) for face shading: brightness = AMBIENT + DIFFUSE * n.l
LIGHT_DIRECTION = np.array([0.35, 0.55, 0.76]) / np.linalg.norm([0.35, 0.55, 0.76])
AMBIENT, DIFFUSE = 0.42, 0.58
NEAR_PLANE = 0.05  # metres; polygons are clipped to camera z >= NEAR_PLANE before projection
SUBPIXEL_BITS = 4  # fillConvexPoly fixed-point vertices: 1/16 px accuracy

# Box corners in box units: corner i has signs (bit2 -> x, bit1 -> y, bit0 -> z) of (l/2, w/2, h/2).
UNIT_CORNERS = np.array([[(1 if i & 4 else -1), (1 if i & 2 else -1), (1 if i & 1 else -1)] for i in range(8)],
                        dtype=np.float64) * 0.5
# The six faces as cyclic corner lists with their outward unit normals in the box frame.
BOX_FACES = (((4, 6, 7, 5), (1, 0, 0)), ((0, 1, 3, 2), (-1, 0, 0)), ((2, 3, 7, 6), (0, 1, 0)),
             ((0, 4, 5, 1), (0, -1, 0)), ((1, 5, 7, 3), (0, 0, 1)), ((0, 2, 6, 4), (0, 0, -1)))

FRONT_FACE = 0  # index in BOX_FACES of the +x face
FRONT_PANEL_INSET = 0.25  # the panel's corners move this fraction of the way to the face centre
FRONT_PANEL_BGR = (38.0, 36.0, 34.0)  # near-black: unlike every instance colour at any shade

GROUND_GREY = 112.0
SKY_HORIZON_BGR = np.array([214.0, 208.0, 200.0])
SKY_ZENITH_BGR = np.array([232.0, 200.0, 170.0])
HAZE_GREY = 175.0
MAX_GROUND_DISTANCE = 400.0  # beyond this the ground is drawn as horizon haze


def yaw_matrix(yaw):
    """(3, 3) rotation about z by ``yaw`` radians."""
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def box_corners(center, size_lwh, yaw):
    """(8, 3) corners of a box (centre (3,), size [l, w, h], yaw about z) in the box's parent frame."""
    return (UNIT_CORNERS * np.asarray(size_lwh, dtype=np.float64)) @ yaw_matrix(yaw).T + np.asarray(center)


def clip_polygon_near(points):
    """Sutherland-Hodgman clip of a (K, 3) camera-frame polygon to z >= NEAR_PLANE; returns (K', 3) or None."""
    out = []
    count = len(points)
    for i in range(count):
        cur, nxt = points[i], points[(i + 1) % count]
        cur_in, nxt_in = cur[2] >= NEAR_PLANE, nxt[2] >= NEAR_PLANE
        if cur_in:
            out.append(cur)
        if cur_in != nxt_in:
            t = (NEAR_PLANE - cur[2]) / (nxt[2] - cur[2])
            out.append(cur + t * (nxt - cur))
    return np.array(out) if len(out) >= 3 else None


# Brightness noise of 1 m ground tiles: a fixed table indexed by the tile's global integer coordinates mod 256.
_TILE_NOISE = np.random.default_rng(20240601).random((256, 256), dtype=np.float32)


class CameraRenderer:
    """Renders one camera of the rig. ``intrinsic`` (3, 3), ``cam_to_ego`` (4, 4), image ``(width, height)``.

    The ground and sky are computed at 1/``ground_downscale`` resolution and upsampled bilinearly (the
    texture is smooth and the model sees images at ~0.2 scale); boxes are drawn at full resolution.
    """

    def __init__(self, intrinsic, cam_to_ego, image_size, ground_downscale=2):
        self.intrinsic = np.asarray(intrinsic, dtype=np.float64)
        self.cam_to_ego = np.asarray(cam_to_ego, dtype=np.float64)
        self.ego_to_cam = np.linalg.inv(self.cam_to_ego)
        self.width, self.height = image_size
        self.downscale = int(ground_downscale)
        self._precompute_ground()

    def _precompute_ground(self):
        """Ego-frame ground coordinates of every (low-resolution) pixel ray hitting the ground; fixed per rig."""
        low_w, low_h = self.width // self.downscale, self.height // self.downscale
        self.low_size = (low_w, low_h)
        # Centre of low-resolution pixel j in full-resolution pixels (cv2.resize's pixel-centre convention).
        us = (np.arange(low_w) + 0.5) * (self.width / low_w) - 0.5
        vs = (np.arange(low_h) + 0.5) * (self.height / low_h) - 0.5
        us, vs = np.meshgrid(us, vs)
        pixels = np.stack([us.ravel(), vs.ravel(), np.ones(us.size)], axis=1)
        rays_ego = pixels @ (self.cam_to_ego[:3, :3] @ np.linalg.inv(self.intrinsic)).T
        origin = self.cam_to_ego[:3, 3]
        with np.errstate(divide='ignore', invalid='ignore'):
            scale = np.where(rays_ego[:, 2] < -1e-9, -origin[2] / rays_ego[:, 2], np.inf)
        distance = scale * np.linalg.norm(rays_ego, axis=1)
        ground = distance < MAX_GROUND_DISTANCE
        self.ground_index = np.flatnonzero(ground)
        self.ground_xy = (origin[:2] + scale[ground, None] * rays_ego[ground, :2]).astype(np.float32)
        dist = distance[ground]
        self.ground_texture_weight = np.exp(-dist / 35.0).astype(np.float32)  # fade texture (anti-alias)
        self.ground_haze_weight = (1.0 - np.exp(-dist / 160.0)).astype(np.float32)
        # Sky: a vertical gradient by the ray's elevation; also the background where the ground is too far.
        elevation = np.clip(rays_ego[:, 2] / np.linalg.norm(rays_ego, axis=1), 0.0, 1.0)
        sky = SKY_HORIZON_BGR + (SKY_ZENITH_BGR - SKY_HORIZON_BGR) * np.sqrt(elevation)[:, None] * 1.6
        self.background = np.clip(sky, 0, 255).astype(np.uint8).reshape(low_h, low_w, 3)

    def render(self, ego_pose_xyyaw, boxes):
        """BGR uint8 (H, W, 3) image for ego pose (x, y, yaw) and ``boxes``: list of dicts with keys
        ``center`` (global, 3), ``size_lwh`` (3), ``yaw`` (global) and ``color`` (BGR, 3 floats)."""
        low = self.background.copy()
        ex, ey, eyaw = ego_pose_xyyaw
        c, s = np.float32(np.cos(eyaw)), np.float32(np.sin(eyaw))
        lx, ly = self.ground_xy[:, 0], self.ground_xy[:, 1]
        # Global ground coordinates relative to an anchor (a multiple of 10 m) keep float32 precise near
        # (400, 1100); tiles and 5 m lines computed locally are then also aligned globally.
        ax, ay = np.floor(ex / 10.0) * 10.0, np.floor(ey / 10.0) * 10.0
        gx = c * lx - s * ly + np.float32(ex - ax)
        gy = s * lx + c * ly + np.float32(ey - ay)
        tiles = _TILE_NOISE[(np.floor(gx).astype(np.int32) + int(ax)) & 255,
                            (np.floor(gy).astype(np.int32) + int(ay)) & 255]
        line_x = np.abs(gx / np.float32(5.0) - np.round(gx / np.float32(5.0)))
        line_y = np.abs(gy / np.float32(5.0) - np.round(gy / np.float32(5.0)))
        on_line = (np.minimum(line_x, line_y) < 0.02).astype(np.float32)  # 0.2 m wide lines every 5 m
        value = GROUND_GREY + self.ground_texture_weight * ((tiles - 0.5) * 24.0 - on_line * 38.0)
        value += self.ground_haze_weight * (HAZE_GREY - value)
        low.reshape(-1, 3)[self.ground_index] = np.clip(value, 0, 255).astype(np.uint8)[:, None]
        image = cv2.resize(low, (self.width, self.height), interpolation=cv2.INTER_LINEAR)
        self.draw_boxes(image, ego_pose_xyyaw, boxes)
        return image

    def global_to_camera(self, ego_pose_xyyaw):
        """(4, 4) global -> camera transform for a flat ego pose (x, y, yaw)."""
        ex, ey, eyaw = ego_pose_xyyaw
        ego_to_global = np.eye(4)
        ego_to_global[:3, :3] = yaw_matrix(eyaw)
        ego_to_global[:2, 3] = (ex, ey)
        return self.ego_to_cam @ np.linalg.inv(ego_to_global)

    def draw_boxes(self, image, ego_pose_xyyaw, boxes):
        """Draws the boxes into ``image`` in place (far first), see ``render``."""
        to_cam = self.global_to_camera(ego_pose_xyyaw)
        rot, trans = to_cam[:3, :3], to_cam[:3, 3]
        items = []
        for box in boxes:
            center_cam = rot @ np.asarray(box['center']) + trans
            items.append((float(np.linalg.norm(center_cam)), box))
        items.sort(key=lambda item: -item[0])
        for _, box in items:
            corners = box_corners(box['center'], box['size_lwh'], box['yaw']) @ rot.T + trans
            if np.all(corners[:, 2] < NEAR_PLANE):
                continue
            box_rot = yaw_matrix(box['yaw'])
            color = np.asarray(box['color'], dtype=np.float64)
            for face_index, (face, normal) in enumerate(BOX_FACES):
                normal_global = box_rot @ np.asarray(normal, dtype=np.float64)
                polygon = corners[list(face)]
                if np.dot(rot @ normal_global, polygon.mean(axis=0)) >= 0:  # back face
                    continue
                shade = AMBIENT + DIFFUSE * max(0.0, float(np.dot(normal_global, LIGHT_DIRECTION)))
                self._fill_polygon(image, polygon, color * shade)
                if face_index == FRONT_FACE:
                    panel = polygon + FRONT_PANEL_INSET * (polygon.mean(axis=0) - polygon)
                    self._fill_polygon(image, panel, np.asarray(FRONT_PANEL_BGR) * shade)

    def _fill_polygon(self, image, polygon_cam, bgr):
        """Fills a planar convex camera-frame polygon (K, 3), clipped at the near plane, with colour ``bgr``."""
        polygon = clip_polygon_near(polygon_cam)
        if polygon is None:
            return
        projected = polygon @ self.intrinsic.T
        uv = projected[:, :2] / projected[:, 2:3]
        if uv[:, 0].max() < 0 or uv[:, 1].max() < 0 or uv[:, 0].min() >= self.width or uv[:, 1].min() >= self.height:
            return
        uv = np.clip(uv, -1e5, 1e5)  # keeps fixed-point vertices inside int32 for grazing faces
        fill = tuple(float(v) for v in np.clip(bgr, 0, 255))
        scale = float(1 << SUBPIXEL_BITS)
        cv2.fillConvexPoly(image, np.round(uv * scale).astype(np.int32), fill, cv2.LINE_AA, SUBPIXEL_BITS)


# HDL-32E like: 32 rings from -30.67 to +10.67 degrees elevation.
LIDAR_ELEVATIONS_DEG = np.linspace(-30.67, 10.67, 32)


class LidarScanner:
    """Ray-casts a spinning 32-ring LiDAR. ``lidar_to_ego`` (4, 4); ``num_azimuth`` steps per revolution."""

    def __init__(self, lidar_to_ego, num_azimuth=600, max_range=70.0):
        self.lidar_to_ego = np.asarray(lidar_to_ego, dtype=np.float64)
        self.max_range = max_range
        azimuth = np.arange(num_azimuth) * (2 * np.pi / num_azimuth)
        elevation = np.deg2rad(LIDAR_ELEVATIONS_DEG)
        az, el = np.meshgrid(azimuth, elevation, indexing='ij')  # point order: azimuth-major, ring-minor
        self.rings = np.tile(np.arange(len(elevation)), num_azimuth).astype(np.float32)
        self.dirs_lidar = np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], -1).reshape(-1, 3)
        self.dirs_ego = self.dirs_lidar @ self.lidar_to_ego[:3, :3].T
        self.origin_ego = self.lidar_to_ego[:3, 3]

    def scan(self, ego_pose_xyyaw, boxes, rng):
        """One sweep. ``boxes``: list of dicts with ``center`` (global), ``size_lwh``, ``yaw``, ``intensity``.

        Returns (points float32 (N, 5) [x, y, z, intensity, ring] in the LiDAR frame, hit_box int (N,) index
        into ``boxes`` or -1 for ground, rays_through_box int (B,): rays crossing each box within range)."""
        ex, ey, eyaw = ego_pose_xyyaw
        dirs, origin = self.dirs_ego, self.origin_ego
        num_rays = len(dirs)
        with np.errstate(divide='ignore', invalid='ignore'):
            t_ground = np.where(dirs[:, 2] < -1e-9, -origin[2] / dirs[:, 2], np.inf)
        t_box = np.full(num_rays, np.inf)
        nearest_box = np.full(num_rays, -1, dtype=np.int64)
        rays_through_box = np.zeros(len(boxes), dtype=np.int64)
        if boxes:
            centers = np.array([b['center'] for b in boxes], dtype=np.float64)
            half = np.array([b['size_lwh'] for b in boxes], dtype=np.float64) / 2.0
            yaws = np.array([b['yaw'] for b in boxes], dtype=np.float64) - eyaw
            ce, se = np.cos(eyaw), np.sin(eyaw)
            rel = centers[:, :2] - (ex, ey)
            centers_ego = np.stack([ce * rel[:, 0] + se * rel[:, 1], -se * rel[:, 0] + ce * rel[:, 1],
                                    centers[:, 2]], axis=1)
            # Bounding-sphere prefilter: only (ray, box) pairs passing within the box's sphere are slab-tested.
            to_center = centers_ego - origin  # (B, 3)
            radius = np.linalg.norm(half, axis=1)
            along = dirs @ to_center.T  # (R, B) distance along each (unit) ray to the closest approach
            perp_sq = (to_center ** 2).sum(axis=1)[None] - along ** 2
            ray_idx, box_idx = np.nonzero((perp_sq < radius[None] ** 2) & (along > -radius[None]))
            cb, sb = np.cos(yaws[box_idx]), np.sin(yaws[box_idx])
            o = origin[None] - centers_ego[box_idx]  # (P, 3) ray origin relative to the box centre
            d = dirs[ray_idx]
            o_box = np.stack([cb * o[:, 0] + sb * o[:, 1], -sb * o[:, 0] + cb * o[:, 1], o[:, 2]], axis=1)
            d_box = np.stack([cb * d[:, 0] + sb * d[:, 1], -sb * d[:, 0] + cb * d[:, 1], d[:, 2]], axis=1)
            d_box = np.where(np.abs(d_box) < 1e-12, 1e-12, d_box)
            t1 = (-half[box_idx] - o_box) / d_box
            t2 = (half[box_idx] - o_box) / d_box
            t_near = np.minimum(t1, t2).max(axis=1)
            t_far = np.maximum(t1, t2).min(axis=1)
            hit = (t_far >= t_near) & (t_near > 0)
            ray_idx, box_idx, t_near = ray_idx[hit], box_idx[hit], t_near[hit]
            in_range = t_near <= self.max_range
            rays_through_box = np.bincount(box_idx[in_range], minlength=len(boxes))
            # Nearest box per ray: visit hits far to near so the nearest assignment is written last.
            order = np.argsort(-t_near, kind='stable')
            t_box[ray_idx[order]] = t_near[order]
            nearest_box[ray_idx[order]] = box_idx[order]
        t_hit = np.minimum(t_box, t_ground)
        keep = t_hit <= self.max_range
        hit_box = np.where(t_box < t_ground, nearest_box, -1)[keep]
        points = np.empty((int(keep.sum()), 5), dtype=np.float32)
        points[:, :3] = t_hit[keep, None] * self.dirs_lidar[keep]
        intensity = rng.uniform(1.0, 12.0, size=len(points))  # road returns are dim
        if boxes:
            box_intensity = np.array([b['intensity'] for b in boxes], dtype=np.float64)
            on_box = hit_box >= 0
            intensity[on_box] = box_intensity[hit_box[on_box]] + rng.uniform(-4.0, 4.0, size=int(on_box.sum()))
        points[:, 3] = np.clip(intensity, 0.0, 255.0)
        points[:, 4] = self.rings[keep]
        return points, hit_box, rays_through_box
