"""The only package that talks to ROS: thin nodes and their rclpy message factory.

Importing it (or ``convert``) does not import rclpy; nodes import it when they start. The message
layouts they share with bag files are in ``data.ros_msgs``.
"""
