"""Video scorers (the seven VBench dimensions of VideoDPO's OmniScore) and the OmniScore aggregate.

Scorer classes live in one module per family and are registered by ``videotuna_dpo.plugin`` as
``"module:attribute"`` references, so importing this package does not import torch.
"""

SCORERS = {
    "temporal_flickering": "videotuna_dpo.scoring.flickering:TemporalFlickering",
    "dynamic_degree": "videotuna_dpo.scoring.motion:DynamicDegree",
    "motion_smoothness": "videotuna_dpo.scoring.motion:MotionSmoothness",
    "subject_consistency": "videotuna_dpo.scoring.dino:SubjectConsistency",
    "aesthetic_quality": "videotuna_dpo.scoring.clip_scorers:AestheticQuality",
    "imaging_quality": "videotuna_dpo.scoring.imaging:ImagingQuality",
    "overall_consistency": "videotuna_dpo.scoring.clip_scorers:OverallConsistency",
    # Not an OmniScore dimension: the mean optical-flow magnitude, which eval reports and pairs --motion-guard uses.
    "motion_magnitude": "videotuna_dpo.scoring.motion_magnitude:MotionMagnitude",
}
