"""The only package that talks to ROS: message conversion and thin nodes.

Importing it (or ``convert``) does not import rclpy; nodes import it when they start.
"""
