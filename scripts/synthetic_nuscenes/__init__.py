"""Synthetic nuScenes dataroot of scripts/make_synthetic_nuscenes.py: ``writer`` writes the tables and sensor
files, ``render`` draws the camera images and LiDAR scans."""
